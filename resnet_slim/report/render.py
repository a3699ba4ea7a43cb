"""Print a report (a list of blocks) as Markdown or as one self-contained HTML page.

A block is a tuple: ("h1" | "h2" | "p", text), ("ul", [text, ...]), ("table", DataFrame),
("pre", text) or ("img", file name, caption). Text may use `code` and **bold**. Images are
looked up by file name: Markdown links to them, HTML embeds them as base64 data URIs, so the
page needs no network and no file beside it.
"""

import base64
import html
import math
import re

import pandas as pd

FORMATS = {
    "top-1 %": "{:.2f}",
    "Δ pp vs ref": "{:+.2f}",
    "params": "{:,.0f}",
    "file MB": "{:.2f}",
    "p50 ms": "{:.3f}",
    "p99 ms": "{:.3f}",
    "speed-up ×": "{:.2f}×",
    "size × smaller": "{:.1f}×",
    "peak RSS MB": "{:.0f}",
    "img/s": "{:,.0f}",
    "latency ×": "{:.2f}×",
    "Δ top-1 pp": "{:+.2f}",
    "PyTorch top-1": "{:.2f}",
    "ONNX top-1": "{:.2f}",
    "Δ pp": "{:+.3f}",
    "teacher": "{:,.0f}",
    "pruned": "{:,.0f}",
    "pruned / teacher": "{:.3f}",
    "release top-1 %": "{:.2f}",
    "release p50 ms": "{:.3f}",
    "release MB": "{:.2f}",
}

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}\n"
    "table{border-collapse:collapse;margin:.6em 0;font-size:.88em}"
    "th,td{border:1px solid #ccc;padding:3px 7px}\n"
    "th{background:#f3f3f3}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}\n"
    "code{background:#f3f3f3;padding:0 3px}"
    "pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}\n"
    "img{max-width:100%;border:1px solid #eee}li{margin:.2em 0}"
)


def cell(value, fmt: str | None = None) -> str:
    """One table cell: fixed decimals, '–' for a missing value or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and fmt is None:
        fmt = "{:.4g}"
    text = fmt.format(value) if fmt else str(value)
    if text.startswith("-") and not re.search(r"[1-9]", text):  # -0.00 is 0.00
        text = ("+" if "{:+" in (fmt or "") else "") + text[1:]
    return text


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """All cells as display strings (FORMATS names the decimals per column)."""
    return pd.DataFrame(
        {c: [cell(v, FORMATS.get(c)) for v in df[c].astype(object)] for c in df.columns}
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate needed)."""
    df = formatted(df)
    lines = [
        "| " + " | ".join(map(str, df.columns)) + " |",
        "|" + "|".join("---" for _ in df.columns) + "|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Escape text, then turn `code` and **bold** into tags."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def render_markdown(blocks: list, image_dir: str = "plots", images: dict | None = None) -> str:
    """Markdown; images link to `image_dir/<name>` (relative to the Markdown file)."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            out.append(markdown_table(rest[0]))
        elif kind == "pre":
            out.append(f"```{rest[1] if len(rest) > 1 else ''}\n{rest[0].rstrip()}\n```")
        elif kind == "img" and (images is None or rest[0] in images):
            out.append(f"![{rest[1]}]({image_dir}/{rest[0]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list, images: dict[str, bytes], title: str = "resnet-slim report") -> str:
    """One HTML page with inline CSS and every figure embedded: nothing is fetched when viewed."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{inline_html(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{inline_html(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            table = formatted(rest[0]).to_html(index=False, border=0, escape=True)
            out.append(re.sub(r"`([^`<]+)`", r"<code>\1</code>", table))
        elif kind == "pre":
            out.append(f"<pre>{html.escape(rest[0])}</pre>")
        elif kind == "img" and rest[0] in images:
            data = base64.b64encode(images[rest[0]]).decode("ascii")
            out.append(
                f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{inline_html(rest[1])}</figcaption></figure>"
            )
    body = "\n".join(out)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
