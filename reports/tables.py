"""Markdown tables of already formatted cells: the one formatter every report uses (pandas only, so `compare`,
which needs no torch, imports no torch)."""

from __future__ import annotations

import pandas as pd


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells (every report of the project uses it)."""
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"
