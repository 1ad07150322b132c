"""Which LLM layers a cache stores, in transformers' ``hidden_states`` numbering.

``hidden_states`` of a model with N decoder layers has N+1 entries: index 0 is the embedding output
(not a layer), index k (1..N) the output of decoder layer k, and index N is taken after the model's
final norm, as transformers returns it. Specs:

==================  ==========================================================
``all``             1..N
``last:K``          the last K layers, N-K+1..N
``every:K``         every K-th layer counted down from the last: N, N-K, N-2K, ... (>= 1)
``penultimate``     N-1, i.e. ``hidden_states[-2]`` (baseline B1)
``i,j,k``           explicit indices; ``a-b`` is an inclusive range; negative values count from the
                    end as in Python (``-2`` is N-1); 0 (the embeddings) only when asked for this way
==================  ==========================================================
"""

from __future__ import annotations

from semroute.shared.errors import SemrouteError

LAYER_SPEC_HELP = "all | last:K | every:K | penultimate | i,j,k (ranges a-b allowed; 0 = embeddings)"


def parse_layers(spec: str | list[int], num_hidden_layers: int) -> list[int]:
    """Turn a layer spec into a sorted list of distinct ``hidden_states`` indices."""
    n = num_hidden_layers
    if isinstance(spec, (list, tuple)):
        return _check(list(spec), n, str(spec))
    text = spec.strip().lower()
    if text == "all":
        return list(range(1, n + 1))
    if text == "penultimate":
        if n < 2:
            raise SemrouteError(f"--layers penultimate needs at least 2 layers; this LLM has {n}")
        return [n - 1]
    for prefix in ("last:", "every:"):
        if text.startswith(prefix):
            try:
                k = int(text[len(prefix):])
            except ValueError:
                raise SemrouteError(f"--layers {spec!r}: expected an integer after '{prefix}'") from None
            if k < 1:
                raise SemrouteError(f"--layers {spec!r}: K must be >= 1")
            if prefix == "last:":
                if k > n:
                    raise SemrouteError(f"--layers {spec!r}: this LLM has only {n} layers")
                return list(range(n - k + 1, n + 1))
            return sorted(range(n, 0, -k))
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1:])
                if hi < lo:
                    raise SemrouteError(f"--layers {spec!r}: range {part!r} is empty")
                indices.extend(range(lo, hi + 1))
            else:
                indices.append(int(part))
        except ValueError:
            raise SemrouteError(f"--layers {spec!r}: cannot read {part!r}; expected {LAYER_SPEC_HELP}") from None
    if not indices:
        raise SemrouteError(f"--layers {spec!r} selects no layer; expected {LAYER_SPEC_HELP}")
    return _check(indices, n, spec)


def _check(indices: list[int], n: int, spec: str) -> list[int]:
    out = []
    for i in indices:
        j = i + n + 1 if i < 0 else i
        if not 0 <= j <= n:
            raise SemrouteError(
                f"--layers {spec!r}: index {i} is out of range; this LLM's hidden_states has indices 0..{n}"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise SemrouteError(f"--layers {spec!r} names a layer twice")
    return sorted(out)
