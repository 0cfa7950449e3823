"""corral's benchmark suite: ``python -m bench`` prints every figure in one table.

Not collected by pytest (``testpaths = tests``); figures and ratios, never timed assertions.
"""
