"""The per-row statistics every backend writes: one (NUM_STATS, N) float32 tensor, rows named here once.

The first four are the row's loss terms (what the public layer reads); the rest are what the gradient pass
needs to recompute the probabilities: the (max, log of the rescaled sum) pairs of s*z, g*v and z. Max and
log-sum stay apart because their fp32 sum, the lse, would lose the log-sum's bits next to a logit of 1e4.
"""
from enum import IntEnum


class Stat(IntEnum):
    LOSS = 0
    KL = 1
    CE = 2
    WEIGHT = 3  # the WTTM weight U, or 1
    MAX_S = 4  # max of s*z
    LOG_SUM_S = 5  # log sum exp(s*z - MAX_S)
    MAX_T = 6  # max of g*v
    LOG_SUM_T = 7
    MAX_Z = 8  # max of z (for the cross-entropy under a student temperature; else MAX_S)
    LOG_SUM_Z = 9


NUM_STATS = len(Stat)
