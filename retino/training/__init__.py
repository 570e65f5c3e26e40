"""Training a run: ``fit`` epoch after epoch (``train``, ``loop``), on any device and under torchrun, into
a run folder that is whole or says why not (``lifecycle``, ``admission``), logged where labs look
(``tracking``)."""
