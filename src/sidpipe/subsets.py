"""Reference subsets: arms that train and score on part of each subject's references.

A grid with `references: 1` (the first image, in sorted image-id order) or `references: "03"`
(the image with that id) runs its methods as *subset methods*, named `<method>--first1` or
`<method>--img03`: the method's settings on the reduced reference set. They are arms of their
own (result folders, summary rows, Pareto points), while the references, masks and
descriptions are the subject's, read through the subset: nothing is copied, and nothing the
full-reference arms have is redone. The paper's single-reference experiment (Fig. 6 and 9) is
such a grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidpipe.io import SidpipeError

SEPARATOR = "--"


def subset_name(method: str, spec: int | str) -> str:
    """`dreambooth`, 1 -> `dreambooth--first1`; `dreambooth`, "03" -> `dreambooth--img03`."""
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise SidpipeError(f"references: {spec!r} is neither a count nor an image id")
    if isinstance(spec, int):
        if spec < 1:
            raise SidpipeError(f"references: {spec} must be at least 1")
        return f"{method}{SEPARATOR}first{spec}"
    return f"{method}{SEPARATOR}img{spec}"


def split_name(name: str) -> tuple[str, int | str | None]:
    """Inverse of `subset_name`: (method, spec), spec None for a method on every reference."""
    method, sep, rest = name.partition(SEPARATOR)
    if not sep:
        return name, None
    if rest.startswith("first") and rest[5:].isdigit():
        return method, int(rest[5:])
    if rest.startswith("img") and rest[3:]:
        return method, rest[3:]
    raise SidpipeError(f"{name!r} is not a subset method name (<method>--first<k> or --img<id>)")


def select_references(image_ids: Sequence[str], spec: int | str | None, where: str) -> list[str]:
    """The image ids a subset keeps, in the given order; all of them for spec None.

    `where` names the subject (or manifest) for the error message."""
    ids = list(image_ids)
    if spec is None:
        return ids
    if isinstance(spec, int):
        if spec > len(ids):
            raise SidpipeError(
                f"{where}: references: {spec} asks for more images than the {len(ids)} it has"
            )
        keep = set(sorted(ids)[:spec])
    else:
        if spec not in ids:
            raise SidpipeError(
                f"{where}: references: {spec!r} is not one of its images "
                f"({', '.join(sorted(ids))}); use an image id or a count"
            )
        keep = {spec}
    return [i for i in ids if i in keep]
