"""``gn-convert list``: the torchvision models gn-convert converts, by task."""

from __future__ import annotations

import argparse

from gn_convert.cli.choices import LazyChoices

TASK_CHOICES = LazyChoices("gn_convert.tasks:TASKS")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``list`` command."""
    p = sub.add_parser("list", help="list the torchvision models gn-convert converts, by task",
                       description="List the torchvision models that contain BatchNorm, by task (classification, "
                       "segmentation, detection, video), and name those of each task without BatchNorm (nothing to "
                       "convert). timm models are named timm/<architecture>[.<pretrained tag>] (pip install "
                       "\"gn-convert[timm]\"; timm.list_models() lists them).")
    p.add_argument("--task", choices=TASK_CHOICES, metavar="TASK",
                   help="one task only (classification, segmentation, detection, video), one name a line")


def run(args: argparse.Namespace) -> int:
    """Print the models: by task with headings, or (``--task``) one name a line."""
    from gn_convert.load.names import list_models, models_by_task

    if args.task:
        for name in list_models(args.task):
            print(name)
        return 0
    for task, (converted, without) in models_by_task().items():
        print(f"{task} ({len(converted)}):")
        for name in converted:
            print(f"  {name}")
        if without:
            print(f"  without BatchNorm, nothing to convert: {', '.join(without)}")
    return 0
