"""Classification-family methods: losses, calibration, distillation, few-shot metric learning, conformal
prediction and linear-evaluation studies, on the shared loop of `models.training`."""
