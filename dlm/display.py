"""The rich live terminal view of generation: a front end of the sampler (the server's page is another)."""

from __future__ import annotations

import time

from dlm.sampling import StepEvent


class LiveView:
    """A rich live display of generation: each row's canvas filling in (masks shown as ░) and a progress bar.

    Use as `with LiveView(tokenizer) as view: generate(..., on_step=view)`. Frames are throttled to
    `fps` so that drawing never dominates a fast sampler; the view disappears when it closes, leaving
    the terminal to the final answers.
    """

    MASK_GLYPH = "░"

    def __init__(self, tokenizer, console=None, max_rows: int = 4, fps: float = 15.0, title: str = "dlm"):
        from rich.console import Console

        self.tokenizer = tokenizer
        self.console = console or Console()
        self.max_rows, self.interval, self.title = max_rows, 1.0 / fps, title
        self._live = None
        self._last = 0.0

    def __enter__(self) -> LiveView:
        from rich.live import Live

        self._live = Live(console=self.console, auto_refresh=False, transient=True)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)
        self._live = None

    def __call__(self, event: StepEvent) -> None:
        now = time.perf_counter()
        if self._live is None or (now - self._last < self.interval and not all(event.done)):
            return
        self._last = now
        self._live.update(self.render(event), refresh=True)

    def canvas_text(self, ids: list[int], mask_id: int):
        """Decoded runs of decided tokens, one dim glyph per mask."""
        from rich.text import Text

        text, run = Text(), []
        for t in ids + [None]:
            if t is not None and t != mask_id:
                run.append(t)
                continue
            if run:
                text.append(self.tokenizer.decode(run, skip_special_tokens=True))
                run = []
            if t is not None:
                text.append(self.MASK_GLYPH, style="dim cyan")
        return text

    def render(self, event: StepEvent):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        panels = []
        for i, ids in enumerate(event.canvases[:self.max_rows]):
            title = f"{self.title} · row {i + 1} · NFE {event.nfe[i]}" + (" · done" if event.done[i] else "")
            panels.append(Panel(self.canvas_text(ids, event.mask_id), title=title, title_align="left",
                                border_style="green" if event.done[i] else "blue"))
        total = sum(event.total)
        decided = total - sum(event.remaining)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=decided, width=40),
                    f"{decided}/{total} tokens · step {event.step}")
        hidden = len(event.canvases) - self.max_rows
        extra = [f"(+{hidden} more rows)"] if hidden > 0 else []
        return Group(*panels, *extra, bar)
