"""``python -m engine.train {data,backbone} ...``: the training entry point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("data", help="prepare the training text (python3.11-doc) into train/val splits")
    p.add_argument("--out", type=Path, default=Path("data/pydoc"))
    p.add_argument("--deb", type=Path, default=None, help="an already downloaded python3.11-doc .deb")
    p = sub.add_parser("backbone", help="train the byte-level backbone LM")
    p.add_argument("--config", type=Path, required=True, help="JSON file of BackboneConfig fields")
    args = parser.parse_args(argv)
    if args.stage == "data":
        from engine.train.data import prepare

        print(json.dumps(prepare(args.out, args.deb), indent=2))
    else:
        from engine.train.backbone import BackboneConfig, train

        print(f"wrote {train(BackboneConfig.from_file(args.config))}")


if __name__ == "__main__":
    main()
