"""Metric values as JSON numbers: numpy and torch scalars, 0-d arrays and
tensors (anything with `.item()`), nested lists and dicts of them. Neither
library is imported: a value is converted by what it can do."""

import math


def plain(value):
    """`value` with every scalar-like object turned into a Python number (or
    bool, str, None), ready for `json.dumps`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    # A 0-d array, a numpy scalar or a one-element tensor (torch moves it off
    # the GPU first: `.item()` does that).
    item = getattr(value, "item", None)
    size = getattr(value, "size", None)
    if callable(size):
        size = size()
        # torch.Size: the number of elements is their product.
        try:
            size = math.prod(size)
        except TypeError:
            pass
    if callable(item) and (size is None or size == 1):
        return plain(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return plain(tolist())
    raise TypeError("metric value {!r} of type {} is not a number".format(value, type(value).__name__))


def metrics(values):
    """A metrics mapping with plain values (keys as strings)."""
    if not isinstance(values, dict):
        raise TypeError("metrics must be a dict of name to value, not {}".format(type(values).__name__))
    return plain(values)
