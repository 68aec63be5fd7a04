"""The composition root: the ``memetrace`` command, the batch pipeline and the demo build the stages
from settings and wire them together; no stage imports this package."""
