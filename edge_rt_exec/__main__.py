"""`python -m edge_rt_exec ...` behaves exactly like `edge-rt-exec ...`."""

from .cli import main

if __name__ == "__main__":
    main()
