"""The built-in offline task: deterministic, sentiment-like sentences whose label needs word order.

    train, dev = synthetic.splits()      # lists of (sentence, label), 6000 / 1200 by default

Each sentence is made of clauses with a polarity ("the plot is good" +1, "the plot is dull" -1,
"i loved it" +1) that negation flips ("the plot is not dull" +1, "i did not love it" -1), joined
so that word order decides which clause carries the label:

    c                      -> polarity(c)
    c1 but c2 / c1 , yet c2 / although c1 , c2
                           -> polarity(c2)       (contrast: the second clause wins)
    c1 , although c2 / c1 even though c2
                           -> polarity(c1)       (concession: the main clause wins)
    c1 and c2              -> the common polarity (both clauses agree)

"the plot is good but the acting is not great" (0) and "the plot is not good but the acting is
great" (1) hold the same words, so a bag-of-words model cannot solve the task; a model that reads
order can reach 100%. Labels: 1 positive, 0 negative. Generated with `random.Random(seed)`: the
same seed gives the same data on every machine and Python version (3.2+).
"""
import random

SUBJECTS = ["the film", "the movie", "the plot", "the acting", "the cast", "the script",
            "the soundtrack", "the ending", "this story", "the director", "the dialogue",
            "the camera work", "the pacing", "the lead", "the sequel", "the show"]
VERBS = ["is", "was", "seems", "felt", "looks", "sounds"]
INTENSIFIERS = ["", "", "", "very", "really", "quite", "truly", "rather", "so", "utterly"]
NEGATORS = ["not", "never", "hardly"]
POSITIVE = ["good", "great", "wonderful", "charming", "brilliant", "moving", "funny", "clever",
            "delightful", "gripping", "beautiful", "fresh", "superb", "touching", "smart"]
NEGATIVE = ["bad", "dull", "boring", "awful", "weak", "clumsy", "bland", "tedious", "messy",
            "predictable", "flat", "stale", "silly", "lifeless", "terrible"]
# (base form, past form, polarity) for "i loved it" / "i did not love it"
OPINIONS = [("love", "loved", 1), ("like", "liked", 1), ("enjoy", "enjoyed", 1),
            ("admire", "admired", 1), ("hate", "hated", -1), ("dislike", "disliked", -1),
            ("regret", "regretted", -1), ("resent", "resented", -1)]
OBJECTS = ["it", "this film", "the movie", "every minute", "the story", "the ending"]


def clause(rng: random.Random, polarity: int) -> str:
    """A clause whose meaning has the given polarity (+1/-1), negated half of the time."""
    negate = rng.random() < 0.45
    surface = -polarity if negate else polarity  # the polarity of the word before negation
    if rng.random() < 0.25:
        base, past, _ = rng.choice([o for o in OPINIONS if o[2] == surface])
        verb = rng.choice([f"did not {base}", f"never {past}"]) if negate else past
        return f"i {verb} {rng.choice(OBJECTS)}"
    adj = rng.choice(POSITIVE if surface > 0 else NEGATIVE)
    intens = rng.choice(INTENSIFIERS)
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    words += [rng.choice(NEGATORS)] if negate else []
    words += [intens] if intens else []
    return " ".join(words + [adj])


def example(rng: random.Random):
    """One (sentence, label) pair with a uniformly random label."""
    label = rng.random() < 0.5
    pol = 1 if label else -1
    form = rng.random()
    if form < 0.25:
        text = clause(rng, pol)
    elif form < 0.5:  # contrast: the second clause decides, the first one disagrees
        join = rng.choice(["{} but {}", "{} , yet {}", "{} , but {}", "although {} , {}"])
        text = join.format(clause(rng, -pol), clause(rng, pol))
    elif form < 0.75:  # concession: the main (first) clause decides
        join = rng.choice(["{} , although {}", "{} even though {}", "{} , though {}"])
        text = join.format(clause(rng, pol), clause(rng, -pol))
    else:  # agreement
        join = rng.choice(["{} and {}", "{} , and {}"])
        text = join.format(clause(rng, pol), clause(rng, pol))
    return text, int(label)


def generate(n: int, seed: int):
    rng = random.Random(seed)
    return [example(rng) for _ in range(n)]


def splits(n_train: int = 6000, n_dev: int = 1200, seed: int = 1234):
    """(train, dev): disjoint seeds; each a list of (sentence, label)."""
    return generate(n_train, seed), generate(n_dev, seed + 1)
