"""The Triton interpreter (CPU CI runs every kernel under it) without its redundant re-patching.

triton 3.9's interpreter patches `triton.language` (every builtin found by inspect.getmembers,
the tensor class, range, reductions) when a kernel is launched, and again, never undone, at
every call of a @triton.jit helper inside the kernel: the helpers of the paged attention
kernels run in loops, so re-patching took half of a decode step's time (a greedy decode of
the fixture through the Triton ops: 18.8 s, 9.5 s without it, the same tokens). A helper's
patch is skipped here only where the running launch has patched the same language modules
already, which then makes no change (its builtins are patched: none is found again; the
rest is set again to equal values); a helper that sees another module (triton's own
`zeros` sees `triton.language.core`) is patched as before. Versions whose interpreter lacks
these names are left as they are: the tests are the same, only slower.
"""

from __future__ import annotations

import functools
import inspect


class _NothingToRestore:
    def restore(self) -> None:
        pass


def skip_nested_repatching() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or getattr(patch_lang, "skips_nested", False):
        return
    launch_call = executor.__call__
    patched: list[frozenset | None] = []  # per running launch: the language modules patched for it

    @functools.cache  # a scan of the function's module globals, at every launch otherwise
    def languages(fn) -> frozenset:  # the modules interpreter._patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_lang_once(fn):
        langs = languages(fn)
        if patched and patched[-1] is not None and langs <= patched[-1]:
            return _NothingToRestore()
        scope = patch_lang(fn)
        if patched:
            patched[-1] = (patched[-1] or frozenset()) | langs
        return scope

    def launch(self, *args, **kwargs):
        patched.append(None)
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            patched.pop()

    patch_lang_once.skips_nested = True
    interpreter._patch_lang = patch_lang_once
    executor.__call__ = launch
