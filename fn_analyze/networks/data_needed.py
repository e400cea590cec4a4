"""How many tokens and neurons an ICA of k components needs, and the refusal or warning when the
data hold fewer.

Tokens are the dimensions the reduction compresses; neurons are the samples the unmixing learns
from. The consensus estimates the maps on the whole data and again on each of `--splits`
disjoint parts of the records, so the rule applies to one part: n_tokens / splits tokens.

- Floor (refused unless `allow_little_data`): a part holds fewer tokens than the columns the
  reduction iterates, k + oversample (2k by default). Its centered rows span fewer principal
  maps than that, so the extra columns, the convergence test and the eigen-gap at k are
  computed on directions that hold no data, and the split agreement that decides which networks
  are emitted compares maps the part does not define.
- Warning: a part holds fewer than TOKENS_PER_COMPONENT tokens per component. The principal maps
  of a sample covariance are off the true ones by about sqrt(k / n) over the eigen-gap, so with
  few tokens per component the top-k subspace follows the sampling noise of these tokens.
- Warning: fewer than NEURONS_PER_COMPONENT neurons per component. ICA on few samples per
  dimension overlearns: it returns spikes, maps carried by a handful of samples (Sarela and
  Vigario 2003, "Overlearning in marginal distribution-based ICA").

Meeting the rule does not make a network a property of the data: a few hundred tokens of any
text already show the model's own structure (its massive neurons, the first token), and the
same networks come back on unrelated text. `fn-analyze compare` of this mask file against one
made on other data tells the two apart (docs/science.md).
"""

from __future__ import annotations

import logging

from shared.errors import ParameterError

log = logging.getLogger(__name__)

TOKENS_PER_COMPONENT = 10
NEURONS_PER_COMPONENT = 10


def tokens_per_part(n_rows: int, splits: int) -> int:
    """Tokens of a part the consensus fits: the whole data, or an even share of `splits` parts (the parts
    are made of whole records, so with few records one can be smaller: the rule is a floor, not a margin)."""
    return n_rows // max(splits, 1)


def _where(n_rows: int, splits: int) -> str:
    part = tokens_per_part(n_rows, splits)
    return f"{n_rows} tokens" + (f", {part} in each of the {splits} parts the consensus compares" if splits else "")


def meets_floor(n_rows: int, k: int, oversample: int, splits: int) -> bool:
    """Whether each part holds the reduction's k + oversample columns' worth of tokens."""
    return tokens_per_part(n_rows, splits) >= k + oversample


def refuse_below_floor(n_rows: int, k: int, oversample: int, splits: int) -> None:
    """The module's floor for k components, as a ParameterError (the caller skips it when told to go on)."""
    if not meets_floor(n_rows, k, oversample, splits):
        raise ParameterError(
            "{n_components} {k} needs at least {floor} tokens in each part (the reduction's k + {oversample} "
            "columns), and the data hold {where}: fewer, and the reduction compares directions that hold no "
            "data; collect more tokens, lower {n_components}, or pass {allow_little_data} to go on",
            k=k,
            floor=k + oversample,
            where=_where(n_rows, splits),
            oversample=oversample,
        )


def warn_little_data(n_rows: int, n_neurons: int, k: int, splits: int) -> None:
    """The module's warnings for k components: too few tokens per component in a part, too few neurons."""
    part, where = tokens_per_part(n_rows, splits), _where(n_rows, splits)
    if part < TOKENS_PER_COMPONENT * k:
        log.warning(
            "%d components on %s: fewer than %d tokens per component, so the networks follow these tokens' "
            "sampling noise and the model's own structure more than the data; collect at least %d tokens%s, "
            "and check them with `fn-analyze compare` against a run on other data",
            k,
            where,
            TOKENS_PER_COMPONENT,
            TOKENS_PER_COMPONENT * k * max(splits, 1),
            f" ({TOKENS_PER_COMPONENT * k} per part)" if splits else "",
        )
    if n_neurons < NEURONS_PER_COMPONENT * k:
        log.warning(
            "%d components over %d neurons: fewer than %d neurons per component, and ICA on so few samples per "
            "dimension returns maps carried by a handful of neurons; lower --n-components to at most %d",
            k,
            n_neurons,
            NEURONS_PER_COMPONENT,
            n_neurons // NEURONS_PER_COMPONENT,
        )
