"""The eval report: each evaluated image beside what the model said about it, as an HTML page with the
images inlined (one file to open or send) and a PNG grid of the same images."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.utils import make_grid


def _as_uint8_image(value: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 from the loaders' uint8 pixels (or a float image in [0, 1])."""
    value = value.detach().cpu()
    return value if value.dtype == torch.uint8 else (value.clamp(0, 1) * 255).round().to(torch.uint8)


def _png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_as_uint8_image(image).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.ndim == 3:
        data = base64.b64encode(_png_bytes(value)).decode()
        return f'<img src="data:image/png;base64,{data}" width="160">'
    if isinstance(value, (list, tuple)):
        return "<br>".join(html.escape(str(v)) for v in value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def write_report(path: Path, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Path]:
    """`path`.html (and `path`.png, a grid of the image column when there is one); returns the files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table></body></html>")
    html_path = path.with_suffix(".html")
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    written = [html_path]
    images = [v for row in rows for v in row if isinstance(v, torch.Tensor) and v.ndim == 3]
    if images and len({tuple(i.shape) for i in images}) == 1:
        grid = make_grid(torch.stack([_as_uint8_image(i) for i in images]), nrow=8, padding=2)
        png_path = path.with_suffix(".png")
        png_path.write_bytes(_png_bytes(grid))
        written.append(png_path)
    return written
