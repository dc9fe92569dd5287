"""The fidelity section's SiFID table: per SinGAN model its source, variants, SiFID, the
real-vs-real floor and their ratio, the copy ratios, and the mean over models. Reads only
fidelity.json's "sifid" (written by synthbreast/eval/sifid.py)."""

from __future__ import annotations

from typing import Any

from synthbreast.report.render import Document, Para, Table, num


def sifid_blocks(doc: Document, data: dict[str, Any]) -> None:
    part = data.get("sifid")
    if not isinstance(part, dict):
        return
    models = [m for m in part.get("per_model") or [] if isinstance(m, dict)]
    overall = part.get("overall") if isinstance(part.get("overall"), dict) else {}
    rows = []
    for m in models:
        copy = m.get("copy") if isinstance(m.get("copy"), dict) else {}
        rows.append([
            str(m.get("model", "—")), str(m.get("label", "—")), f"`{m.get('source_key', '—')}`",
            str(m.get("variants", "—")), num(m.get("sifid")),
            num(m.get("floor")), num(m.get("ratio")),
            num(copy.get("ratio_min")), num(copy.get("share_below_threshold")),
        ])  # fmt: skip
    rows.append([
        "mean", "", f"{overall.get('models', len(models))} models",
        str(overall.get("variants", "—")), num(overall.get("sifid")),
        num(overall.get("floor")), num(overall.get("ratio")),
        num(overall.get("copy_ratio_min")),
        num(overall.get("copy_share_below_threshold")),
    ])  # fmt: skip
    space = part.get("space", "?")
    paper = "the paper's layer" if part.get("paper_space") else "not the paper's Inception layer"
    doc.add(
        Table(
            ["model", "class", "source", "variants", "SiFID", "floor (real vs real)", "ratio",
             "copy ratio min", f"copies (< {num(part.get('copy_threshold'), 2)})"],
            rows,
            caption=(
                f"SiFID of the SinGAN variants against their source image, space `{space}` "
                f"({part.get('layer', '?')}; {paper}). Floor: the source against "
                f"{part.get('floor_images', '?')} other real images of its class from the "
                f"{part.get('floor_pool', '?')} pool. Ratio = SiFID / floor: about 1 = as far "
                "from the source as another real image, near 0 = close to the source. Copy "
                "ratio: pixel distance to the source / to the nearest other real image "
                "(0 = a copy)"
            ),
        )
    )  # fmt: skip
    notes = [str(n) for n in part.get("notes") or []]
    notes += [f"model {m.get('model')}: {m['note']}" for m in models if m.get("note")]
    if notes:
        doc.add(Para("SiFID notes: " + "; ".join(notes) + "."))
