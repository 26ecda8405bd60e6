"""How a layer spec holds its MLP moved in Megatron-Core: a `ModuleSpec` up to 0.16, a
`functools.partial` builder from 0.17 on (`TransformerLayerSubmodules.mlp`, read in 0.19.2's
source). Spec edits go through these two functions, whichever form they get."""

from __future__ import annotations

import dataclasses
import functools


def submodules(spec):
    """The submodules dataclass of a ModuleSpec or of a partial builder."""
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def with_submodules(spec, **changes):
    """`spec`, in the same form, with some of its submodules replaced."""
    new = dataclasses.replace(submodules(spec), **changes)
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": new})
    return dataclasses.replace(spec, submodules=new)
