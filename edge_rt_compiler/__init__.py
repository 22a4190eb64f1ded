"""edge-rt compiler: model -> graph IR -> partitioned plan with a static memory layout."""

__version__ = "0.1.0"
