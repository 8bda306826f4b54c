"""Render a terminal capture (`tmux capture-pane -p -e`: text with ANSI colours) as a PNG, for the README.

    tmux capture-pane -p -e -t demo > screen.txt
    .venv/bin/python scripts/terminal_png.py screen.txt docs/img/run-local.png

Knows the SGR codes the job's console logs and rich's bars use (reset, bold, dim, 8/16 colours, 256-colour
greys); other escapes are dropped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BG, FG = (24, 24, 27), (220, 220, 220)
BASE = [(40, 40, 40), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200), (188, 63, 188),
        (17, 168, 205), (229, 229, 229)]
BRIGHT = [(102, 102, 102), (241, 76, 76), (35, 209, 139), (245, 245, 67), (59, 142, 234), (214, 112, 214),
          (41, 184, 219), (255, 255, 255)]
ESCAPE = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def spans(line: str, state: dict):
    """(text, colour, bold) pieces of one line; `state` carries the style across lines."""
    pos = 0
    for m in ESCAPE.finditer(line):
        if m.start() > pos:
            yield line[pos:m.start()], state["fg"], state["bold"]
        pos = m.end()
        if m.group(2) != "m":
            continue
        codes = [int(c) for c in m.group(1).split(";") if c.isdigit()] or [0]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                state.update(fg=FG, bold=False)
            elif c == 1:
                state["bold"] = True
            elif c == 2:
                state["fg"] = tuple(v // 2 + 40 for v in state["fg"])
            elif c in (22, 39):
                state.update(fg=FG, bold=False) if c == 39 else state.update(bold=False)
            elif 30 <= c <= 37:
                state["fg"] = BASE[c - 30]
            elif 90 <= c <= 97:
                state["fg"] = BRIGHT[c - 90]
            elif c == 38 and i + 2 < len(codes) and codes[i + 1] == 5:
                n = codes[i + 2]
                state["fg"] = BRIGHT[n - 8] if 8 <= n < 16 else BASE[n] if n < 8 else \
                    (lambda g: (g, g, g))(8 + 10 * (n - 232)) if n >= 232 else FG
                i += 2
            i += 1
    if pos < len(line):
        yield line[pos:], state["fg"], state["bold"]


def render(text: str, out: Path, size: int = 14) -> None:
    import matplotlib

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    regular = ImageFont.truetype(str(fonts / "DejaVuSansMono.ttf"), size)
    bold = ImageFont.truetype(str(fonts / "DejaVuSansMono-Bold.ttf"), size)
    lines = text.rstrip("\n").split("\n")
    width = max(len(ESCAPE.sub("", line)) for line in lines)
    cw, ch = regular.getlength("M"), int(size * 1.35)  # a cell: the monospace advance, not the glyph's box
    image = Image.new("RGB", (int(cw * width) + 24, ch * len(lines) + 24), BG)
    draw = ImageDraw.Draw(image)
    state = {"fg": FG, "bold": False}
    for row, line in enumerate(lines):
        column = 0
        for piece, colour, heavy in spans(line, state):
            draw.text((12 + column * cw, 12 + row * ch), piece, fill=colour, font=bold if heavy else regular)
            column += len(piece)
    image.save(out, optimize=True)


if __name__ == "__main__":
    render(Path(sys.argv[1]).read_text(errors="replace"), Path(sys.argv[2]))
