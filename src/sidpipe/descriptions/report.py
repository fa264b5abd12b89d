"""The report's table of descriptions: every reference image beside its description in each
set."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_file, read_csv


def write_descriptions_table(
    references_dir: Path, description_csvs: list[Path], out_html: Path, thumb: int = 96
) -> None:
    """A self-contained HTML table for the report: a thumbnail per reference image and its
    description in every set (HTML-escaped: descriptions are model output)."""
    import base64
    import html
    import io

    from PIL import Image

    sets: dict[str, dict[str, str]] = {}
    for path in description_csvs:
        for row in read_csv(path):
            column = sets.setdefault(f"{row['descriptions']} (case {row['case']})", {})
            column[row["image_id"]] = row["description"]
    header = "".join(f"<th>{html.escape(name)}</th>" for name in sets)
    body = []
    for ref in read_csv(Path(references_dir) / "manifest.csv"):
        buffer = io.BytesIO()
        image = Image.open(Path(references_dir) / ref["path"]).convert("RGB")
        image.resize((thumb, thumb)).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        cells = "".join(
            f"<td>{html.escape(texts.get(ref['image_id'], '—'))}</td>" for texts in sets.values()
        )
        body.append(
            f"<tr><td><img src='data:image/png;base64,{data}' width={thumb}><br>"
            f"{html.escape(ref['image_id'])}</td>{cells}</tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;max-width:320px}</style>"
        f"</head><body><table><tr><th>image</th>{header}</tr>{''.join(body)}</table></body></html>"
    )
    with atomic_file(out_html) as handle:
        handle.write(page)
