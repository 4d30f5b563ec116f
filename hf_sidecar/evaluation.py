"""The cached (lam, gamma) grid on validation prompts and the selection of edits from it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .edit import revoke_model_
from .metrics import RefusalScorer, closure
from .process import load_parameters
from .sidecar import Sidecar

logger = logging.getLogger(__name__)

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
EDIT_KINDS = ("task_arithmetic", "diagonal", "sidecar_2d")


@dataclass
class Grid:
    """Validation closure at every ``(lam, gamma)`` point; ``closure[i, j]`` is at ``(lams[i], gammas[j])``."""

    lams: list[float]
    gammas: list[float]
    closure: np.ndarray

    def value(self, lam: float, gamma: float) -> float:
        return float(self.closure[self.lams.index(lam), self.gammas.index(gamma)])

    def select(self) -> dict[str, tuple[float, float]]:
        """Best task-arithmetic point (gamma = 0), best diagonal point (gamma = lam) and best 2D point.

        Ties go to the first point in grid order, i.e. the smallest coefficients.
        """
        if 0.0 not in self.gammas:
            raise ValueError("The grid needs gamma = 0 to select task arithmetic.")
        column = self.gammas.index(0.0)
        lam_ta = self.lams[int(np.argmax(self.closure[:, column]))]
        diagonal = [(lam, lam) for lam in self.lams if lam in self.gammas]
        if not diagonal:
            raise ValueError("The grid has no point with gamma = lam, so the diagonal cannot be selected.")
        best_diagonal = max(diagonal, key=lambda point: (self.value(*point), -point[0]))
        row, col = np.unravel_index(int(np.argmax(self.closure)), self.closure.shape)
        return {
            "task_arithmetic": (lam_ta, 0.0),
            "diagonal": best_diagonal,
            "sidecar_2d": (self.lams[row], self.gammas[col]),
        }

    def to_dict(self) -> dict:
        return {"lams": self.lams, "gammas": self.gammas, "closure": self.closure.tolist()}

    @classmethod
    def from_dict(cls, values: Mapping) -> "Grid":
        return cls(list(values["lams"]), list(values["gammas"]), np.asarray(values["closure"], dtype=float))


def scores_at(
    model, scorer: RefusalScorer, theta_ams: Mapping[str, torch.Tensor], sidecars: Sidecar | Sequence[Sidecar], lam: float, gamma: float
) -> np.ndarray:
    """Refusal scores of the model edited to ``(lam, gamma)`` from the stored safety-trained weights."""
    revoke_model_(model, sidecars, lam=lam, gamma=gamma, verify=False, reference=theta_ams)
    return scorer.scores(model)


def evaluate_grid(
    model,
    scorer: RefusalScorer,
    theta_ams: Mapping[str, torch.Tensor],
    sidecars: Sidecar | Sequence[Sidecar],
    oracle_scores: np.ndarray,
    unedited_scores: np.ndarray,
    *,
    lams: Sequence[float] = DEFAULT_GRID,
    gammas: Sequence[float] = DEFAULT_GRID,
    progress: bool = True,
) -> Grid:
    """Validation closure over the grid; the model's parameters end at theta_AMS."""
    values = np.zeros((len(lams), len(gammas)))
    points = [(i, j) for i in range(len(lams)) for j in range(len(gammas))]
    for i, j in tqdm(points, desc="Grid", disable=not progress, leave=False):
        scores = scores_at(model, scorer, theta_ams, sidecars, lams[i], gammas[j])
        values[i, j] = closure(scores, oracle_scores, unedited_scores)
    load_parameters(model, theta_ams)
    return Grid(list(map(float, lams)), list(map(float, gammas)), values)
