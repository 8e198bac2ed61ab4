"""The load tester's progress display."""
from __future__ import annotations

import sys


class Progress:
    """tqdm if installed, else rich, else a line a second on stderr; `none` shows nothing."""

    def __init__(self, kind: str, total_s: float):
        self.total_s, self.kind, self._bar, self._last_line = total_s, kind, None, -1.0
        if kind == "auto":
            self.kind = "simple"
            for candidate in ("tqdm", "rich"):
                try:
                    __import__(candidate)
                    self.kind = candidate
                    break
                except ImportError:
                    pass
        if self.kind == "tqdm":
            from tqdm import tqdm
            self._bar = tqdm(total=round(total_s, 1), unit="s", desc="loadtest", file=sys.stderr,
                             bar_format="{desc} {bar} {n:.1f}/{total:.1f} s {postfix}")
        elif self.kind == "rich":
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(TextColumn("loadtest"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task("loadtest", total=total_s, info="")

    def update(self, elapsed: float, finished: int, failed: int) -> None:
        rate = finished / elapsed if elapsed > 0 else 0.0
        elapsed = min(elapsed, self.total_s)
        info = f"{finished} req, {rate:,.0f} req/s, {failed} errors"
        if self.kind == "tqdm":
            self._bar.n = round(elapsed, 1)
            self._bar.set_postfix_str(info, refresh=False)
            self._bar.refresh()
        elif self.kind == "rich":
            self._bar.update(self._task, completed=elapsed, info=info)
        elif self.kind == "simple" and elapsed - self._last_line >= 1.0:
            self._last_line = elapsed
            print(f"[{elapsed:6.1f}/{self.total_s:.1f} s] {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.kind == "tqdm":
            self._bar.close()
        elif self.kind == "rich":
            self._bar.stop()
