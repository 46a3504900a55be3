"""Command line for rounds.

    python -m lib.rounds history STATE_DIR [--png out.png] [--plotter auto|matplotlib|pil] [--no-png]
        print the round history as a table, and the organs revised per round; write PNGs of mean
        validation Dice per round (default: STATE_DIR/rounds_dice.png) and of the organs revised per
        round (beside it, rounds_revised.png)
    python -m lib.rounds start [--server http://127.0.0.1:8000]
        ask a running server for a round now, through MONAI Label's train endpoint (task "round")
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

ROUND_TASK = "round"


def cmd_history(args) -> int:
    from lib.rounds.history import default_png, format_revisions, format_table, load_entries, plot_dice, plot_revised

    if not os.path.exists(args.state):
        print(f"no round log at {args.state}", file=sys.stderr)
        return 2
    path, entries = load_entries(args.state)
    print(f"round log: {path}")
    print(format_table(entries))
    print()
    print("organs revised per round:")
    print(format_revisions(entries))
    if args.no_png:
        return 0
    png = args.png or default_png(path)
    try:
        used = plot_dice(entries, png, plotter=args.plotter)
        revised_png = os.path.join(os.path.dirname(os.path.abspath(png)), "rounds_revised.png")
        plot_revised(entries, revised_png, plotter=args.plotter)
    except ImportError as e:
        print(f"no PNG written: {e}", file=sys.stderr)
        return 1
    print(f"Dice plot: {png} ({used})")
    print(f"revisions plot: {revised_png}")
    return 0


def cmd_start(args) -> int:
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    try:
        res = MONAILabelClient(args.server).train_start(args.task, {})
    except MONAILabelClientException as e:
        print(f"the server refused the round: {e.msg}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach {args.server}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2, default=str))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.rounds", description="Active-learning rounds")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("history", help="print the round history and plot Dice per round")
    h.add_argument("state", help="rounds state folder (or its rounds.json)")
    h.add_argument("--png", help="where to write the Dice plot (default: <state>/rounds_dice.png)")
    h.add_argument("--plotter", choices=["auto", "matplotlib", "pil"], default="auto")
    h.add_argument("--no-png", action="store_true", help="print the table only")
    h.set_defaults(func=cmd_history)
    s = sub.add_parser("start", help="ask a running server for a round now")
    s.add_argument("--server", default="http://127.0.0.1:8000")
    s.add_argument("--task", default=ROUND_TASK, help="train task that runs a round (default: round)")
    s.set_defaults(func=cmd_start)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
