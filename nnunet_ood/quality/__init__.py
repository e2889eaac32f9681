"""Should this segmentation be trusted? Failure examples, a quality model and an accept/review decision.

* :mod:`~nnunet_ood.quality.corruptions`: the corruption family that turns a fold's validation cases into
  failure examples without new labels (TorchIO transforms, seeded, graded severities).
* :mod:`~nnunet_ood.quality.grouped_cv`, :mod:`~nnunet_ood.quality.model`: the quality model (predicted
  Dice per case from method scores and segmentation properties), chosen by cross-validation grouped by case
  and stored as JSON.
* :mod:`~nnunet_ood.quality.risk_control`: conformal risk control of the share of silent failures
  (accepted and failed) for the accept/review decision.
"""
