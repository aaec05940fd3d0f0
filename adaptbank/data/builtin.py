"""Built-in generated classification tasks: the embedded default when no data is on the machine.

Each generator writes natural-ish English sentences from templates, vocabulary lists and random fillers.
Output is a pure function of ``(task, split, n)``: the RNG is ``random.Random(f"adaptbank-builtin-{task}-{split}")``,
labels are class-balanced (counts differ by at most one), texts are unique within a split, and the test
split never repeats a text of the default-size train split.

The tasks are meant to be learnable but not trivial for a frozen sentence-embedding linear probe. About
80% of sentences carry a *strong* cue (a class keyword: "the rain was pouring down"). The other ~20%
(:data:`HARD_FRACTION`, split evenly over three kinds) are *hard* but unambiguous to a careful reader:

- *weak-only*: an indirect cue with no class keyword ("my shoes were soaked after ten steps" -> rainy);
- *foil + weak*: a negated or side mention of another class plus an indirect cue of the true class
  ("the promised sunshine never came, and puddles formed in every gutter" -> rainy), so the surface
  vocabulary points at the wrong class;
- *symmetric contrast*: key phrases of the true class and another class in one sentence ("they
  forecast sunshine, but we got rain" -> rainy); the mirrored sentence has the same words and the
  other label, so only order and negation decide.

Label names are unique across tasks, so a shared label space never merges two tasks' classes.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

__all__ = ["BUILTIN_SPLITS", "BUILTIN_TASKS", "DEFAULT_SIZES", "HARD_FRACTION", "generate"]

BUILTIN_SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 600, "test": 200}
HARD_FRACTION = 0.2
"""Share of hard sentences (weak-only, foil + weak, symmetric contrast; a third each).

Measured with a logistic-regression probe on frozen all-MiniLM-L6-v2 embeddings (600 train / 200 test,
C=1..10), this puts test accuracy at roughly 0.83-0.96 depending on the task, well below 100%."""


def _s(text: str) -> list[str]:
    """Split a ``|``-separated vocabulary string (keeps the tables below compact)."""
    return [part.strip() for part in text.split("|") if part.strip()]


# The vocabulary tables read best as compact |-separated strings, so the formatter leaves them alone.
# fmt: off
# Per task: labels, fillers, easy templates ({cue}), hard templates ({cue} weak, {foil} another class),
# and per class: strong cues, weak cues (no class keyword), foils (negated/side mentions of the class).
_TASKS: dict[str, dict[str, Any]] = {
    "weather": {
        "fillers": {
            "time": _s("this morning|this afternoon|tonight|all weekend|on Monday|yesterday|at dawn|after lunch|"
                       "by the evening|through the night|on the drive home|all week|during the parade"),
            "place": _s("Oslo|Lisbon|the valley|the old town|Denver|the coast|our village|the campsite|downtown|"
                        "the mountains|Glasgow|the airport|the countryside|Quebec|the park|the suburbs|Kyoto|Reykjavik"),
            "person": _s("my neighbour|the pilot|the ranger|our guide|the farmer|Grandma|the bus driver|"
                         "a reporter|the coach|my sister"),
        },
        "easy": _s("{time} in {place}, {cue}.|{person} told us that {cue} {time}.|In {place} {time}, {cue}.|"
                   "We looked outside {time} and {cue}.|According to {person}, {cue} in {place} {time}."),
        "hard": _s("{time} in {place}, {foil}, and {cue}.|{person} said {foil}; instead {cue}.|"
                   "In {place} {time} {foil}, but {cue}."),
        "classes": {
            "sunny": (
                _s("the sun was blazing in a cloudless sky|it was bright and sunny|everyone needed sunglasses "
                   "and sunscreen|the sunshine was warm and dazzling|there was not a cloud, only sunshine|"
                   "the sun beat down on the pavement|people were sunbathing in the heat|it was a clear, sunny day"),
                _s("we spent hours at the beach and came home with a tan|the laundry dried on the line in minutes|"
                   "the ice cream van sold out by noon|the shadows were sharp and short|the solar panels hit "
                   "record output|the cafe terraces were packed with people in t-shirts"),
                _s("it was not sunny at all|the promised sunshine never came|the sun never showed up|"
                   "forget the sunny forecast"),
            ),
            "rainy": (
                _s("it rained heavily|the rain was pouring down|there was a steady drizzle|the streets flooded "
                   "after the downpour|raindrops drummed on the roof|everyone carried an umbrella through the "
                   "showers|heavy rain soaked the streets|a thunderstorm brought sheets of rain"),
                _s("my shoes were soaked after ten steps|puddles formed in every gutter|the picnic was moved "
                   "indoors as the gutters overflowed|the wipers were on full speed the whole drive|the windows "
                   "were streaked with water|we waited under the bus shelter, dripping"),
                _s("there was not a drop of rain|the rain they forecast never arrived|nobody needed an "
                   "umbrella|the storm warning for rain was a false alarm"),
            ),
            "snowy": (
                _s("it snowed heavily|fresh snow covered the ground|a blizzard buried the roads in snow|"
                   "snowflakes kept falling|the snowplows were out all night|thick snowdrifts blocked the door|"
                   "light snow dusted the rooftops|we shoveled snow off the driveway"),
                _s("the kids went sledging down the hill|schools closed and the roads turned white|we needed "
                   "chains on the tyres|everything was buried under a white blanket|the ski lifts opened early|"
                   "footprints crunched on the white ground"),
                _s("no snow fell|the snow we hoped for never came|there was no sign of a blizzard|"
                   "the snowplows stayed in the depot"),
            ),
            "windy": (
                _s("the wind was howling|strong gusts knocked over the bins|a gale was blowing|the wind tore "
                   "leaves from the trees|it was extremely windy|powerful gusts rattled the windows|the breeze "
                   "turned into a fierce wind|kites flew high in the strong wind"),
                _s("hats were flying down the street|the flags stood straight out|the ferry was cancelled "
                   "because of the rough crossing|my hair was a mess within seconds|doors kept slamming shut on "
                   "their own|the trampoline ended up in the next garden"),
                _s("there was hardly any wind|the air was completely still|the gale warning was a false alarm|"
                   "not even a breeze moved the trees"),
            ),
        },
    },
    "reviews": {
        "fillers": {
            "product": _s("blender|laptop bag|pair of headphones|coffee maker|desk lamp|backpack|phone case|kettle|"
                          "vacuum cleaner|yoga mat|toaster|keyboard|office chair|water bottle|air fryer|tent|"
                          "electric toothbrush|rice cooker"),
            "when": _s("last month|two weeks ago|in the spring|on sale|for my birthday|after reading the reviews|"
                       "as a gift|last year"),
            "aspect": _s("the battery|the build quality|the price|the design|the manual|the customer service|"
                         "the packaging|the noise level|the handle|the colour"),
        },
        "easy": _s("I bought this {product} {when} and {cue}.|About the {product}: {cue}.|"
                   "Got the {product} {when}; {cue}.|Honest review of the {product}: {cue}.|"
                   "My verdict on the {product} I got {when}: {cue}."),
        "hard": _s("I bought this {product} {when}. {foil}, and {cue}.|About the {product}: {foil}; {cue}.|"
                   "The {product} arrived {when}. {foil}, but {cue}."),
        "classes": {
            "dislikes": (
                _s("I regret buying it|it broke within a week and I want a refund|it is a waste of money|"
                   "I am returning it, terrible quality|it is the worst purchase I have made|it stopped "
                   "working and support ignored me|I would not recommend it to anyone|it is flimsy and "
                   "disappointing|{aspect} is awful and the rest is not much better"),
                _s("it now lives in a drawer and I use my old one again|I had to contact the seller three "
                   "times|the box is already back at the post office|my ten-year-old one still works better|"
                   "it made a strange smell on the first day|I gave up on it after two days"),
                _s("I expected to hate it|the reviews called it junk|I was ready to send it back|"
                   "it is not bad at all"),
            ),
            "mixed": (
                _s("some parts are great but others are annoying|it does the job, though it has clear flaws|"
                   "I have mixed feelings about it|the good and the bad roughly cancel out|it is fine for the "
                   "price, nothing special|I like the design but {aspect} lets it down|it is okay, three stars|"
                   "half of it impresses me and half of it frustrates me"),
                _s("I keep it, but I would look around before buying again|it depends on what you need it for|"
                   "it is what I expected, no more and no less|some days it works well, some days it does not|"
                   "{aspect} is nice, the rest less so|my partner uses it, I mostly don't"),
                _s("my feelings are not mixed at all|it is not just average|there is nothing so-so about it|"
                   "I would not call it merely okay"),
            ),
            "likes": (
                _s("I absolutely love it|it works perfectly and I would buy it again|it is the best purchase I "
                   "have made this year|I recommend it to everyone|it exceeded my expectations|it is sturdy, "
                   "quiet and a joy to use|five stars, fantastic value|I am delighted with it"),
                _s("I use it every single day now|I already ordered a second one for my parents|my whole family "
                   "keeps borrowing it|I stopped looking at other models|it replaced three other things I owned|"
                   "I have told all my friends where to get it"),
                _s("it is not the amazing product the ads promised|I would not call it great|"
                   "the five-star reviews oversell it|it is far from perfect"),
            ),
        },
    },
    "intent": {
        "fillers": {
            "city": _s("Paris|Tokyo|Chicago|Madrid|Nairobi|Sydney|Toronto|Berlin|Lima|Seoul|Cairo|Dublin"),
            "when": _s("tomorrow|next Friday|on the 12th|this weekend|early next week|tonight|in March"),
            "genre": _s("jazz|rock|classical|hip hop|country|lo-fi|reggae|techno|folk|blues"),
            "artist": _s("Adele|the Beatles|Miles Davis|Taylor Swift|Daft Punk|Bob Marley|Beyonce|Coldplay"),
            "clock": _s("6 am|6:30|7 in the morning|five fifteen|8:45|noon|9 pm|half past seven"),
            "account": _s("checking|savings|joint|business|credit card|student"),
            "dish": _s("a pepperoni pizza|pad thai|sushi|a burrito|chicken curry|two burgers|ramen|a falafel wrap"),
            "place": _s("the Thai place|Luigi's|the corner diner|that sushi bar|the taco truck"),
            "pre": ["", "", "please", "hey,", "ok assistant,", "quick question:", "hi there,"],
        },
        "easy": _s("{pre} {cue}|{pre} {cue} please|{pre} {cue}, thanks|{pre} I'd like you to {cue}|can you {cue}?"),
        "hard": _s("{pre} {foil}, {cue}|{pre} {foil}; {cue}|{foil}. {pre} {cue}"),
        "classes": {
            "book_flight": (
                _s("book me a flight to {city} {when}|find a plane ticket to {city} {when}|reserve a seat on "
                   "the next flight to {city}|book a one-way flight to {city} {when}|get me airline tickets "
                   "to {city} {when}|book the cheapest flight to {city}"),
                _s("I have to be in {city} {when}, sort out the travel|which airline is cheapest to {city} "
                   "{when}|is there an aisle seat left to {city} {when}|get me to {city} by air {when}"),
                _s("I don't need a flight to {city}|forget booking plane tickets {when}|no need to book the trip to {city}"),
            ),
            "play_music": (
                _s("play some {genre} music|put on the new {artist} album|start my {genre} playlist|shuffle "
                   "songs by {artist}|play {artist} on the speaker|turn on some {genre} tunes"),
                _s("I am in the mood for some {artist}|it is too quiet in here, give me some {genre}|let's "
                   "have something upbeat in the background|I want to hear {artist}"),
                _s("stop playing the {genre} playlist|no music from {artist} right now|turn off the {artist} songs"),
            ),
            "set_alarm": (
                _s("set an alarm for {clock}|wake me up at {clock} {when}|I need an alarm at {clock}|create "
                   "an alarm for {clock} on weekdays|set my alarm clock to {clock} {when}"),
                _s("make sure I am up by {clock} {when}|I can't oversleep {when}, I have to be up at {clock}|"
                   "buzz me at {clock}|don't let me sleep past {clock}"),
                _s("no alarm needed {when}, I'll wake up on my own|don't set an alarm for {clock}|skip the {clock} alarm"),
            ),
            "check_balance": (
                _s("what is the balance of my {account} account|how much money is in my {account} account|"
                   "show me my {account} balance|check the balance in my {account} account|tell me my "
                   "current {account} balance"),
                _s("can I afford a new bike right now|did my salary come in yet|am I overdrawn on {account}|"
                   "how broke am I this month|what's left in {account} after rent"),
                _s("I don't care about my {account} balance|never mind checking the {account} account|"
                   "forget the bank balance for now"),
            ),
            "order_food": (
                _s("order {dish} from {place}|get me {dish} delivered|I want to order {dish} for dinner|place "
                   "a delivery order for {dish}|order {dish} for pickup at {place}"),
                _s("I am starving and don't want to cook|dinner should be {dish} from somewhere|bring me "
                   "{dish}|feed me, I'm too tired to cook, maybe {dish}"),
                _s("I'm not ordering {dish} from {place}|no food delivery {when}|don't order the {dish}"),
            ),
        },
    },
    "topic": {
        "fillers": {
            "src": _s("a new article explains that|the podcast reported that|our newsletter says|"
                      "a forum post claims that|today's lecture covered how|the magazine noted that|"
                      "my friend told me that|the documentary showed how"),
        },
        "easy": _s("{src} {cue}.|{cue}, according to experts.|{src} {cue}, which surprised many readers."),
        "hard": _s("{src}, after {foil}, {cue}.|Amid talk of {foil}, {src} {cue}.|{src} {cue}, not {foil}."),
        "classes": {
            "astronomy": (
                _s("the telescope captured a distant galaxy|astronomers tracked a comet passing near Mars|"
                   "the planet orbits its star every twelve days|a meteor shower will peak tonight|the nebula "
                   "glows in infrared light|a supernova was spotted in a nearby galaxy"),
                _s("people stayed up all night to watch the sky over the desert|the light we see left its "
                   "source millions of years ago|the probe sent back pictures from the far side|"
                   "the eclipse will be visible only from the southern hemisphere"),
                _s("a long debate about telescopes and distant galaxies|the comet astronomers tracked last month|"
                   "a lecture on planets and their orbits"),
            ),
            "cooking": (
                _s("you should simmer the sauce for twenty minutes|the recipe calls for butter, garlic and "
                   "basil|you knead the dough until it is smooth|roasting the vegetables in a hot oven works "
                   "best|the chef seared the steak in a cast-iron pan|you whisk the eggs with a pinch of salt"),
                _s("the secret is patience and a low flame|a little more lemon fixes almost anything|"
                   "leftovers taste even better the next day|resting it for ten minutes keeps it juicy"),
                _s("a recipe for garlic butter sauce|the chef's new tasting menu|an argument about how to knead dough"),
            ),
            "football": (
                _s("the striker scored twice in the second half|the goalkeeper saved a late penalty|the coach "
                   "changed the formation at half-time|the league title was decided on the final matchday|"
                   "the midfielder was sent off for a reckless tackle|the club signed a new winger"),
                _s("the fans sang for ninety minutes|it went to extra time and then to a shootout|the transfer "
                   "window closes on Friday|the away end was sold out weeks ago"),
                _s("the striker's two goals in the derby|a disputed penalty in the league match|the coach's new formation"),
            ),
            "finance": (
                _s("the central bank raised interest rates|shares fell after the quarterly earnings report|"
                   "investors moved money into government bonds|inflation squeezed household budgets|the fund "
                   "diversified its portfolio|the company's stock price doubled"),
                _s("the market had its worst week since spring|everyone is worried about their savings|the "
                   "merger was approved by a narrow vote|the quarterly numbers beat expectations"),
                _s("the central bank's interest rate decision|falling share prices on the stock market|"
                   "a fund rebalancing its bond portfolio"),
            ),
            "medicine": (
                _s("the patient responded well to the new antibiotic|doctors recommend a vaccine booster|the "
                   "clinical trial reduced blood pressure|the surgeon repaired a torn ligament|the nurse "
                   "checked the patient's symptoms|the drug lowered the risk of heart attack"),
                _s("the recovery took six weeks of rest|the side effects were mild|getting a second opinion "
                   "from a specialist helped|the symptoms faded after three days"),
                _s("the new vaccine booster|a clinical trial of a blood pressure drug|the hospital's new surgeon"),
            ),
            "programming": (
                _s("the function returns a sorted list|the compiler flagged a type error|the team refactored "
                   "the code into smaller modules|the bug was a race condition between threads|the API "
                   "returns JSON|unit tests caught a regression in the parser"),
                _s("it worked on one laptop but failed on the server|the build has been broken since Tuesday|"
                   "the new release fixes a memory leak|nobody wants to touch the legacy module"),
                _s("a compiler bug in the latest release|the team's move to a new programming language|"
                   "unit tests and code reviews"),
            ),
        },
    },
}

# Symmetric contrasts: one short key phrase per class, used as "{other} ... but {key}". The mirrored
# sentence (classes swapped) has the same bag of words and the other label, so only word order and
# negation decide: a pooled-embedding linear probe cannot get these all right by vocabulary alone.
_CONTRAST: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "weather": (
        _s("{time} in {place}, they forecast {other}, but we got {key}.|We were promised {other} {time}; what "
           "{place} actually got was {key}.|Not {other} but {key} {time} in {place}."),
        {
            "sunny": _s("sunshine|clear skies|hot sun"),
            "rainy": _s("rain|showers|a downpour"),
            "snowy": _s("snow|a blizzard|snowfall"),
            "windy": _s("strong wind|gales|gusts"),
        },
    ),
    "reviews": (
        _s("I expected the {product} to be {other}, but it turned out to be {key}.|Everyone called the "
           "{product} {other}; for me it is {key}.|The {product} is {key}, not {other}."),
        {
            "dislikes": _s("a total disappointment|a waste of money|junk"),
            "mixed": _s("a so-so product|a mixed bag|just average"),
            "likes": _s("a great buy|an absolute gem|excellent"),
        },
    ),
    "intent": (
        _s("{pre} don't {other}, {key} instead|{pre} I said {key}, not {other}|"
           "{pre} I never asked you to {other}, just {key}"),
        {
            "book_flight": _s("book a flight to {city}|get plane tickets to {city}"),
            "play_music": _s("play some {genre}|put on {artist}"),
            "set_alarm": _s("set an alarm for {clock}|wake me at {clock}"),
            "check_balance": _s("check my {account} balance|tell me what's in my {account} account"),
            "order_food": _s("order {dish}|get {dish} delivered"),
        },
    ),
    "topic": (
        _s("This piece is about {key}, not {other}.|Although it mentions {other}, the article is really about "
           "{key}.|{src} the real subject was {key}, not {other}."),
        {
            "astronomy": _s("telescopes and galaxies|planets and comets"),
            "cooking": _s("recipes and sauces|ovens and dough"),
            "football": _s("strikers and penalties|goals and league tables"),
            "finance": _s("stocks and interest rates|banks and bonds"),
            "medicine": _s("vaccines and patients|doctors and clinical trials"),
            "programming": _s("compilers and code|bugs and software releases"),
        },
    ),
}

# fmt: on

BUILTIN_TASKS: dict[str, tuple[str, ...]] = {task: tuple(spec["classes"]) for task, spec in _TASKS.items()}
"""Builtin task name -> label names in index order."""

_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: random.Random, fillers: dict[str, list[str]]) -> str:
    return _SLOT.sub(lambda m: rng.choice(fillers[m.group(1)]), template)


def _sentence(task: str, label: int, rng: random.Random) -> str:
    spec = _TASKS[task]
    fillers: dict[str, list[str]] = spec["fillers"]
    classes: dict[str, tuple[list[str], list[str], list[str]]] = spec["classes"]
    strong, weak, _ = classes[BUILTIN_TASKS[task][label]]
    names = BUILTIN_TASKS[task]
    other = rng.choice([name for i, name in enumerate(names) if i != label])
    if rng.random() >= HARD_FRACTION:
        text = rng.choice(spec["easy"]).replace("{cue}", rng.choice(strong))
    elif (kind := rng.random()) < 1 / 3:  # weak-only: an indirect cue in an ordinary template
        text = rng.choice(spec["easy"]).replace("{cue}", rng.choice(weak))
    elif kind < 2 / 3:  # foil + weak: the surface vocabulary points at another class
        text = rng.choice(spec["hard"]).replace("{cue}", rng.choice(weak))
        text = text.replace("{foil}", rng.choice(classes[other][2]))
    else:  # symmetric contrast: both classes' key phrases; order and negation decide
        templates, keys = _CONTRAST[task]
        text = rng.choice(templates).replace("{key}", rng.choice(keys[names[label]]))
        text = text.replace("{other}", rng.choice(keys[other]))
    text = re.sub(r"\s+", " ", _fill(text, rng, fillers)).strip()
    text = (
        re.sub(r"([.;] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text) if ". " in text else text
    )
    return text[0].upper() + text[1:]


@lru_cache(maxsize=32)
def _generate_cached(task: str, split: str, n: int) -> tuple[tuple[str, int], ...]:
    rng = random.Random(f"adaptbank-builtin-{task}-{split}")
    k = len(BUILTIN_TASKS[task])
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    seen: set[str] = set()
    if split != "train":  # keep test texts out of the default-size train split
        seen.update(text for text, _ in _generate_cached(task, "train", DEFAULT_SIZES["train"]))
    out: list[tuple[str, int]] = []
    for label in labels:
        for _attempt in range(10_000):
            text = _sentence(task, label, rng)
            if text not in seen:
                break
        else:  # pragma: no cover - the template space is far larger than any sensible n
            raise RuntimeError(f"builtin task {task!r}: could not draw {n} unique {split} sentences")
        seen.add(text)
        out.append((text, label))
    return tuple(out)


def generate(task: str, split: str, n: int | None = None) -> list[tuple[str, int]]:
    """Return ``n`` deterministic ``(text, label_index)`` pairs for a builtin ``task`` and ``split``.

    ``n`` defaults to :data:`DEFAULT_SIZES` (600 train / 200 test). Labels index ``BUILTIN_TASKS[task]``.
    """
    if task not in BUILTIN_TASKS:
        raise ValueError(f"unknown builtin task {task!r}; allowed: {sorted(BUILTIN_TASKS)}")
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown builtin split {split!r}; allowed: {list(BUILTIN_SPLITS)}")
    if n is None:
        n = DEFAULT_SIZES[split]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000:
        raise ValueError(f"n must be an int in [1, 100000], got {n!r}")
    return list(_generate_cached(task, split, n))
