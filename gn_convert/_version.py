"""The version of gn-convert, alone, so that modules can import it without the package."""

__version__ = "0.1.0"
