"""The per-row statistics every backend writes: one (NUM_STATS, N) float32 tensor, rows named here once.

The first four are the row's loss terms (what the public layer reads); then what the gradient pass needs to
recompute the probabilities: the (max, log of the rescaled sum) pairs of s*z, g*v and z (max and log-sum stay
apart because their fp32 sum, the lse, would lose the log-sum's bits next to a logit of 1e4) and the row sum the
gradient of the reverse KL and the JSD needs; last, the student's entropy (for logging).
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
    DIV_GRAD = 10  # the reverse KL's own sum, the JSD's KL(q || m) (its gradient's); 0 for the forward KL
    ENTROPY = 11  # -sum q log q of the student's q = softmax(s*z)


NUM_STATS = len(Stat)
# The rows of the per-row terms the orchestrators keep (``linear.ROW_TERMS``' order): loss, kl, ce, weight,
# entropy; the same in TopkStat.
ROW_TERM_STATS = [0, 1, 2, 3, 11]


class PieceSum(IntEnum):
    """The sums of a second pass over one piece of a row (``pieces``), which add up to the row's."""

    KL = 0  # the divergence's terms
    DIV_GRAD = 1
    ENTROPY = 2


NUM_PIECE_SUMS = len(PieceSum)


class TopkStat(IntEnum):
    """The statistics of a sparse (top-k) teacher's loss: Stat's rows, except that the teacher has no row to
    sum over, and the rows that hold the teacher's sums for a dense one hold the student's over R, the
    columns outside the teacher's k ids (its tail bucket)."""

    LOSS = 0
    KL = 1
    CE = 2
    WEIGHT = 3
    MAX_S = 4  # max of s*z over the row
    LOG_SUM_S = 5
    MAX_R = 6  # max of s*z over R
    LOG_SUM_R = 7
    MAX_Z = 8
    LOG_SUM_Z = 9
    DIV_GRAD = 10
    ENTROPY = 11  # over S and the bucket with tail "bucket", over the vocabulary with "renormalize"


class Partial(IntEnum):
    """The online sums of one piece of a row (a column range: a piece of a split row, a rank's vocabulary
    shard), which merge exactly into the row's: maxima by max, sums by sum_c d_c exp(m_c - M)."""

    MAX_S = 0  # max of s*z over the piece
    SUM_S = 1  # sum exp(s*z - MAX_S)
    MAX_T = 2  # g*v
    SUM_T = 3
    MAX_V = 4  # v (WTTM weight)
    SUM_V = 5
    MAX_Z = 6  # z (cross-entropy under a student temperature)
    SUM_Z = 7
    TARGET_LOGIT = 8  # z[y] in the piece that holds column y, else -inf (merged by max)


NUM_PARTIAL = len(Partial)


class TopkPartial(IntEnum):
    """The online sums of a piece of a row (a vocabulary shard) over its columns outside a top-k teacher's S,
    which merge exactly into TopkStat's with the k logits of S (``_topk_ops.TopkPieces``)."""

    MAX_S = 0  # max of s*z over the piece's columns of R
    SUM_S = 1  # sum exp(s*z - MAX_S)
    MAX_Z = 2  # z (cross-entropy under a student temperature; else a copy of MAX_S)
    SUM_Z = 3
    TAIL_ENTROPY = 4  # w = sum e_j (MAX_S - s*z_j), e_j = exp(s*z_j - MAX_S): R's share of the entropy (renormalize)


NUM_TOPK_PARTIAL = len(TopkPartial)
