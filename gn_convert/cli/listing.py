"""``gn-convert list``: the torchvision models that contain BatchNorm."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``list`` command."""
    sub.add_parser("list", help="list the torchvision models gn-convert converts",
                   description="List the torchvision classification models that contain BatchNorm. timm models "
                   "are named timm/<architecture>[.<pretrained tag>] (pip install \"gn-convert[timm]\"; "
                   "timm.list_models() lists them; models/CATALOG.md has the ones swept).")


def run(args: argparse.Namespace) -> int:
    """Print one model name per line."""
    from gn_convert.load.names import list_models

    for name in list_models():
        print(name)
    return 0
