"""`python -m cli.together ROWS.json`: the process `grid --together` starts (workflows/grid.py `run_together`).

ROWS.json: {"names": [...], "args": [fit arguments per row], "result": path}. Builds each row with the one
`build_cli` and hands the builder to the broadcaster (workflows/grid_together.py), which never imports `cli`;
writes the failed rows' names to `result`.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from cli.lightning_cli import build_cli
from workflows.grid_together import fit_together


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    failed = fit_together(spec["args"], spec["names"],
                          build=partial(build_cli, run=False, prog="python -m cli grid --together"))
    Path(spec["result"]).write_text(json.dumps(failed))
    if failed:
        sys.exit(f"python -m cli grid --together: rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
