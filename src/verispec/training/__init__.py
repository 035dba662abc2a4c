"""Aligning drafters with the target: distillation data, draft-model distillation, Medusa and EAGLE heads.

data      the target answers prompts made from local text (sequence-level KD); features cached
prompts   those prompts, and the guard that keeps Spec-Bench questions out
common    budget, checkpoints, progress, loss curves
distill   draft-model distillation (DistillSpec): divergences, fixed and on-policy data
medusa_train, eagle_train   head training
"""
