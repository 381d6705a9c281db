"""Figures a clinician can read: maps drawn over anatomy (:mod:`mmai.figures.overlay`) and the
TensorBoard image summaries of validation overlays (:mod:`mmai.figures.tensorboard`).

Evaluation curves (ROC, PR, calibration, Kaplan-Meier, training curves) live in :mod:`mmai.plots`.
matplotlib is imported inside the functions only: importing mmai never touches its state.
"""
