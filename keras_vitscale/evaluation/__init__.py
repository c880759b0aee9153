"""Evaluation of frozen representations: few-shot ridge regression."""

from keras_vitscale.evaluation.features import extract_features
from keras_vitscale.evaluation.fewshot import FewShotResult
from keras_vitscale.evaluation.fewshot import RidgeFit
from keras_vitscale.evaluation.fewshot import fewshot
from keras_vitscale.evaluation.fewshot import fit_ridge
