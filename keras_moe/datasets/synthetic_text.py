"""Procedurally generated multi-domain byte-level text.

The corpus mixes five "domains", each with its own grammar and alphabet, so
that a Mixture-of-Experts model has something to specialise on:

| id | domain           | looks like                                       | "positive" means            |
|----|------------------|--------------------------------------------------|-----------------------------|
| 0  | `movie_review`   | `the plot was gripping. it runs 95 minutes.`      | praise wins                 |
| 1  | `product_review` | `sturdy lid. the battery is unpredictable.`       | praise wins                 |
| 2  | `arithmetic`     | `37-52=-15 8+41=49 90-12=78`                      | most results are >= 0       |
| 3  | `dna`            | `GCCGTAGCGGCTACGG...`                             | more G/C than A/T bases     |
| 4  | `server_log`     | `{"path":"/cart","status":503,"ms":87}`           | more 2xx than 5xx responses |

Every label is an exact function of the text, so a perfect classifier exists,
but the cues are domain-specific: half of the sentiment words of each review
domain are shared with the other review domain *with the opposite polarity* ("unpredictable", "cheap", "simple", ... praise a film and damn a
kettle), and a digit or a minus sign matters in one domain and not in another.
A model has to recognise the domain before it can read the cue, which is what
per-domain experts are good at.

Text is ASCII, tokenised as raw bytes: token id = byte value, vocabulary size
256, id 0 reserved for padding (generated text never contains byte 0).
Generation is pure Python/NumPy, seeded and deterministic across runs and
platforms (`random.Random` seeded with a string, which hashes it with SHA-512).
"""

import collections
import random

import numpy as np

from keras_moe import _checks

TextSplit = collections.namedtuple("TextSplit", ["x", "y", "domains"])
TextSplit.__doc__ = """One split of a byte-level text dataset.

Fields:
    x: int32 array of byte token ids. `(num_examples, sequence_length)`.
        Classification: the text left-aligned, padded with 0 on the right.
        Language modelling: the input bytes (no padding).
    y: int32 array. Classification: `(num_examples,)` class ids.
        Language modelling: `(num_examples, sequence_length)` next-byte
        targets, `y[:, t] == x[:, t + 1]` within the underlying stream.
    domains: int32 array of domain ids, indexing `info["domain_names"]`.
        Classification: `(num_examples,)`, one per example.
        Language modelling: `(num_examples, sequence_length)`, the domain
        of each input token (documents can change inside a sequence).
"""

DOMAIN_NAMES = (
    "movie_review",
    "product_review",
    "arithmetic",
    "dna",
    "server_log",
)
CLASS_NAMES = ("negative", "positive")
LABEL_DESCRIPTIONS = {
    "movie_review": "positive: more praising than damning sentiment words",
    "product_review": "positive: more praising than damning sentiment words",
    "arithmetic": "positive: more equations with a result >= 0 than < 0",
    "dna": "positive: more G/C bases than A/T bases",
    "server_log": "positive: more 2xx responses than 5xx responses",
}
VOCABULARY_SIZE = 256
PADDING_ID = 0
DOCUMENT_SEPARATOR = "\n"
# Every generated sentence/equation/record is at most this long, so any
# classification example of at least this many bytes holds one whole cue.
MAX_UNIT_LENGTH = 44
MIN_CLASSIFICATION_SEQUENCE_LENGTH = 48
# Language-modelling documents are between these lengths (separator excluded).
_MIN_DOCUMENT_LENGTH = 48
_MAX_DOCUMENT_LENGTH = 192

# === Review domains ===
# Sentiment words by polarity (+1 praise, -1 blame). Four of the eight words
# of each polarity are shared with the other review domain with the opposite
# polarity: "unpredictable" praises a film and damns a kettle.
_MOVIE_WORDS = {
    +1: ("gripping", "brilliant", "haunting", "bold", "unpredictable",
         "dark", "loud", "slow"),
    -1: ("boring", "clumsy", "forgettable", "dull", "predictable", "cheap",
         "simple", "lightweight"),
}
_PRODUCT_WORDS = {
    +1: ("sturdy", "reliable", "quiet", "compact", "predictable", "cheap",
         "simple", "lightweight"),
    -1: ("flimsy", "faulty", "leaky", "bulky", "unpredictable", "dark",
         "loud", "slow"),
}
_MOVIE_NOUNS = ("plot", "film", "ending", "acting", "script", "score",
                "pacing", "cast", "story", "dialogue", "villain", "sequel")
_PRODUCT_NOUNS = ("battery", "charger", "screen", "blender", "kettle",
                  "keyboard", "strap", "lid", "motor", "speaker", "case",
                  "cable")
# Templates shared by both review domains: only the noun tells them apart.
_REVIEW_TEMPLATES = (
    "the {noun} is {word}.",
    "the {noun} was {word}.",
    "{word} {noun}.",
    "really {word} {noun}!",
    "i found the {noun} {word}.",
    "such a {word} {noun}.",
)
_DAYS = ("monday", "tuesday", "friday", "sunday")
_PEOPLE = ("my sister", "my dad", "a friend", "my kids", "my uncle")
_MOVIE_NEUTRAL = (
    "we saw it on {day}.",
    "it runs {number} minutes.",
    "watched it with {person}.",
    "the {noun} has {number} parts.",
    "the {noun} is by {name}.",
)
_PRODUCT_NEUTRAL = (
    "arrived on {day}.",
    "bought it for {person}.",
    "it weighs {number} grams.",
    "the {noun} came in a box.",
    "model {name}-{number}.",
)
_NAMES = ("ada", "kim", "luis", "noor", "ravi", "zoe")


def _review_unit(rng, polarity, words, nouns, neutral_templates):
    noun = rng.choice(nouns)
    if polarity == 0:
        template = rng.choice(neutral_templates)
        return template.format(
            noun=noun,
            day=rng.choice(_DAYS),
            person=rng.choice(_PEOPLE),
            number=rng.randint(2, 180),
            name=rng.choice(_NAMES),
        )
    template = rng.choice(_REVIEW_TEMPLATES)
    return template.format(noun=noun, word=rng.choice(words[polarity]))


def _movie_unit(rng, polarity):
    return _review_unit(rng, polarity, _MOVIE_WORDS, _MOVIE_NOUNS,
                        _MOVIE_NEUTRAL)


def _product_unit(rng, polarity):
    return _review_unit(rng, polarity, _PRODUCT_WORDS, _PRODUCT_NOUNS,
                        _PRODUCT_NEUTRAL)


# === Arithmetic domain ===
def _arithmetic_unit(rng, polarity):
    # polarity +1: a correct equation with a result >= 0; -1: result < 0.
    a = rng.randint(0, 99)
    b = rng.randint(0, 99)
    if polarity > 0:
        if rng.random() < 0.5:
            return f"{a}+{b}={a + b}"
        a, b = max(a, b), min(a, b)
    else:
        if a == b:
            b = a + 1
        a, b = min(a, b), max(a, b)
    return f"{a}-{b}={a - b}"


# === Server log domain ===
_PATHS = ("/cart", "/login", "/search", "/checkout", "/health",
          "/api/users", "/api/items", "/img/logo")
_STATUSES = {
    +1: (200, 201, 202, 204),
    -1: (500, 502, 503, 504),
    0: (301, 304, 400, 401, 403, 404),
}


def _server_log_unit(rng, polarity):
    # Longest: {"path":"/api/users","status":503,"ms":999} = 43 bytes.
    status = rng.choice(_STATUSES[polarity])
    path = rng.choice(_PATHS)
    return f'{{"path":"{path}","status":{status},"ms":{rng.randint(1, 999)}}}'


# (unit maker, probability of a neutral unit, separator) per domain.
_UNIT_DOMAINS = {
    0: (_movie_unit, 0.3, " "),
    1: (_product_unit, 0.3, " "),
    2: (_arithmetic_unit, 0.0, " "),
    4: (_server_log_unit, 0.3, " "),
}
# Probability that a cue-bearing unit agrees with the intended label; the
# others are distractors, so the label is a majority vote over the cues.
_P_AGREE = 0.75
_MAX_MISFITS = 3


def _compose_units(rng, domain, target_length, label):
    """Strings units together up to `target_length` bytes.

    Returns `(text, derived_label)`; `derived_label` is the majority polarity
    of the cues in the text (1 or 0), or `None` on a tie.
    """
    make_unit, p_neutral, separator = _UNIT_DOMAINS[domain]
    agreeing = 1 if label == 1 else -1
    units = []
    length = 0
    net_polarity = 0
    misfits = 0
    # Stop after a few units in a row do not fit, so that a long unit drawn
    # early does not leave the document much shorter than its budget.
    while misfits < _MAX_MISFITS:
        if rng.random() < p_neutral:
            polarity = 0
        elif rng.random() < _P_AGREE:
            polarity = agreeing
        else:
            polarity = -agreeing
        unit = make_unit(rng, polarity)
        extra = len(unit) + (len(separator) if units else 0)
        if length + extra > target_length:
            misfits += 1
            continue
        misfits = 0
        units.append(unit)
        length += extra
        net_polarity += polarity
    text = separator.join(units)
    if net_polarity == 0:
        return text, None
    return text, int(net_polarity > 0)


def _compose_dna(rng, target_length, label):
    # GC-rich (label 1) or AT-rich (label 0) strand of exactly target_length.
    p_gc = 0.62 if label == 1 else 0.38
    weights = (p_gc / 2, p_gc / 2, (1 - p_gc) / 2, (1 - p_gc) / 2)
    text = "".join(rng.choices("GCAT", weights=weights, k=target_length))
    gc_count = text.count("G") + text.count("C")
    at_count = target_length - gc_count
    if gc_count == at_count:
        return text, None
    return text, int(gc_count > at_count)


def _compose(rng, domain, target_length, label):
    if domain == 3:
        return _compose_dna(rng, target_length, label)
    return _compose_units(rng, domain, target_length, label)


def _compose_with_label(rng, domain, target_length, label):
    # Rejection sampling: about 80% of draws already carry the wanted label.
    for _ in range(1000):
        text, derived_label = _compose(rng, domain, target_length, label)
        if derived_label == label:
            return text
    raise RuntimeError(  # Unreachable in practice; a guard against bugs.
        f"Could not generate a {DOMAIN_NAMES[domain]} example with "
        f"label={label} in {target_length} bytes."
    )


def _encode_padded(texts, sequence_length):
    """ASCII strings -> int32 `(len(texts), sequence_length)`, 0-padded."""
    padded = b"".join(
        text.encode("ascii").ljust(sequence_length, b"\0") for text in texts
    )
    tokens = np.frombuffer(padded, dtype=np.uint8)
    return tokens.reshape(len(texts), sequence_length).astype(np.int32)


def _rng(task, seed, split):
    # Independent streams per split: the test set does not change when
    # num_train does.
    return random.Random(f"keras_moe.datasets.{task}/{seed}/{split}")


def _classification_split(rng, num_examples, sequence_length):
    num_domains = len(DOMAIN_NAMES)
    # Exactly balanced (domain, label) cells, up to one example per cell.
    cells = [
        (index % num_domains, (index // num_domains) % 2)
        for index in range(num_examples)
    ]
    rng.shuffle(cells)
    min_length = max(MIN_CLASSIFICATION_SEQUENCE_LENGTH, sequence_length // 2)
    texts = []
    for domain, label in cells:
        target_length = rng.randint(min_length, sequence_length)
        texts.append(_compose_with_label(rng, domain, target_length, label))
    domains, labels = zip(*cells)
    return TextSplit(
        x=_encode_padded(texts, sequence_length),
        y=np.asarray(labels, dtype=np.int32),
        domains=np.asarray(domains, dtype=np.int32),
    )


def load_text_classification(
    num_train=10000,
    num_test=2000,
    sequence_length=128,
    seed=0,
):
    """Loads a synthetic IMDB-like binary classification task on bytes.

    Each example is one document from one of five domains (see the module
    docstring); its label says whether the domain's "positive" cue wins a
    majority vote inside the document. Domains and labels are balanced
    (every `(domain, label)` cell gets `num // 10` or one more examples).
    Each document gets a budget of between `max(48, sequence_length // 2)`
    and `sequence_length` bytes and is filled with whole sentences,
    equations or records until the next one does not fit (within 44 bytes
    of the budget); the rest of the row is padding (id 0).

    How hard it is (2,000 training examples of 128 bytes): a logistic
    regression on hashed byte bigrams reaches about 92% test accuracy but
    only about 80-86% on the two review domains, whose shared sentiment
    words flip polarity; the same model fitted per domain reaches about 98%
    (96-98% on reviews). A 2-layer, 64-wide transformer trained on 8,000
    examples reaches about 81% after one epoch and 89% after four.

    Generating 10,000 examples of 128 bytes takes about 0.3 s.

    Args:
        num_train: positive int, number of training examples.
        num_test: positive int, number of test examples.
        sequence_length: int >= 48, length in bytes of each padded example.
        seed: non-negative int. The same seed gives the same arrays; the
            test split does not depend on `num_train`.

    Returns:
        `(train, test, info)`. `train` and `test` are `TextSplit` named
        tuples `(x, y, domains)`:
        - `x`: int32 `(num, sequence_length)` byte ids, 0 = padding.
        - `y`: int32 `(num,)` class ids, 0 = "negative", 1 = "positive".
        - `domains`: int32 `(num,)` domain ids.
        `info` is a dict with `class_names`, `domain_names`,
        `label_descriptions` (domain name -> meaning of "positive"),
        `vocabulary_size` (256), `padding_id` (0) and `sequence_length`.

    Example:

    >>> train, test, info = load_text_classification(
    ...     num_train=100, num_test=20, sequence_length=64)
    >>> train.x.shape, train.y.shape, train.domains.shape
    ((100, 64), (100,), (100,))
    >>> info["domain_names"][train.domains[0]] in info["domain_names"]
    True
    >>> (x_train, y_train, _), (x_test, y_test, _), _ = (train, test, info)
    """
    num_train = _checks.check_positive_int("num_train", num_train)
    num_test = _checks.check_positive_int("num_test", num_test)
    sequence_length = _checks.check_positive_int(
        "sequence_length",
        sequence_length,
        minimum=MIN_CLASSIFICATION_SEQUENCE_LENGTH,
    )
    seed = _checks.check_seed(seed)
    task = "text_classification"
    train = _classification_split(
        _rng(task, seed, "train"), num_train, sequence_length
    )
    test = _classification_split(
        _rng(task, seed, "test"), num_test, sequence_length
    )
    info = {
        "class_names": list(CLASS_NAMES),
        "domain_names": list(DOMAIN_NAMES),
        "label_descriptions": dict(LABEL_DESCRIPTIONS),
        "vocabulary_size": VOCABULARY_SIZE,
        "padding_id": PADDING_ID,
        "sequence_length": sequence_length,
    }
    return train, test, info


def _language_modeling_split(rng, num_sequences, sequence_length):
    # One stream of documents from random domains, each ended by "\n", cut
    # into non-overlapping windows of sequence_length + 1 bytes.
    window = sequence_length + 1
    needed = num_sequences * window
    documents = []
    document_domains = []
    document_lengths = []
    total_length = 0
    while total_length < needed:
        domain = rng.randrange(len(DOMAIN_NAMES))
        target_length = rng.randint(_MIN_DOCUMENT_LENGTH, _MAX_DOCUMENT_LENGTH)
        text, _ = _compose(rng, domain, target_length, rng.randrange(2))
        text += DOCUMENT_SEPARATOR
        documents.append(text)
        document_domains.append(domain)
        document_lengths.append(len(text))
        total_length += len(text)
    stream = np.frombuffer("".join(documents).encode("ascii"), dtype=np.uint8)
    # The separator byte belongs to the document it ends.
    domain_stream = np.repeat(
        np.asarray(document_domains, dtype=np.int32), document_lengths
    )
    tokens = stream[:needed].reshape(num_sequences, window).astype(np.int32)
    domains = domain_stream[:needed].reshape(num_sequences, window)
    return TextSplit(x=tokens[:, :-1], y=tokens[:, 1:], domains=domains[:, :-1])


def load_language_modeling(
    num_train=10000,
    num_test=1000,
    sequence_length=128,
    seed=0,
):
    """Loads a synthetic byte-level language-modelling corpus.

    Documents (48 to 192 bytes) of the five domains of the module docstring,
    drawn uniformly at random, are concatenated with "\\n" after each one and
    cut into non-overlapping windows of `sequence_length + 1` bytes; a window
    often spans several documents, so the model has to notice domain
    switches, and `domains` gives the domain of every input token for
    routing maps. There is no padding. Vocabulary: the 256 byte values
    (generated text uses only printable ASCII and "\\n"; 0 never occurs).

    Generating 10,000 sequences of 128 bytes takes about 0.4 s.

    Args:
        num_train: positive int, number of training sequences.
        num_test: positive int, number of test sequences.
        sequence_length: positive int, length of the input sequences.
        seed: non-negative int. The same seed gives the same arrays; the
            test split does not depend on `num_train`.

    Returns:
        `(train, test, info)`. `train` and `test` are `TextSplit` named
        tuples `(x, y, domains)`, each field an int32 array of shape
        `(num, sequence_length)`:
        - `x`: input byte ids.
        - `y`: targets, the next byte of each input (`y[:, :-1] == x[:, 1:]`).
        - `domains`: domain id of each input token (the "\\n" ending a
          document counts as part of it).
        `info` is a dict with `domain_names`, `vocabulary_size` (256),
        `padding_id` (0, unused here), `sequence_length` and
        `document_separator` ("\\n").

    Example:

    >>> train, test, info = load_language_modeling(
    ...     num_train=10, num_test=2, sequence_length=32)
    >>> train.x.shape, train.y.shape, train.domains.shape
    ((10, 32), (10, 32), (10, 32))
    >>> bool((train.y[:, :-1] == train.x[:, 1:]).all())
    True
    """
    num_train = _checks.check_positive_int("num_train", num_train)
    num_test = _checks.check_positive_int("num_test", num_test)
    sequence_length = _checks.check_positive_int(
        "sequence_length", sequence_length
    )
    seed = _checks.check_seed(seed)
    task = "language_modeling"
    train = _language_modeling_split(
        _rng(task, seed, "train"), num_train, sequence_length
    )
    test = _language_modeling_split(
        _rng(task, seed, "test"), num_test, sequence_length
    )
    info = {
        "domain_names": list(DOMAIN_NAMES),
        "vocabulary_size": VOCABULARY_SIZE,
        "padding_id": PADDING_ID,
        "sequence_length": sequence_length,
        "document_separator": DOCUMENT_SEPARATOR,
    }
    return train, test, info


def decode_bytes(token_ids):
    """Turns byte token ids back into text, dropping padding (id 0).

    Args:
        token_ids: 1-D sequence (list or array) of ints in `[0, 255]`.

    Returns:
        A `str`; bytes that are not valid UTF-8 become U+FFFD.

    Example:

    >>> decode_bytes([104, 105, 0, 0])
    'hi'
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise ValueError(
            "Received an invalid value for `token_ids`, expected a 1-D "
            f"sequence. Received: token_ids with shape {token_ids.shape}"
        )
    kept = token_ids[token_ids != PADDING_ID].astype(np.uint8)
    return kept.tobytes().decode("utf-8", errors="replace")
