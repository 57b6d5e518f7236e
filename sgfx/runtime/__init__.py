"""What a run stands on: calibration inputs (:mod:`.calibration`), the memory cap and estimate (:mod:`.memory`),
the activation store that keeps a sweep's values within it (:mod:`.activations`), and processes working together
(:mod:`.distributed`, which does nothing without a process group)."""
