"""Grammar of voice-assistant commands: the text side of the synthetic Chorus corpus.

A sentence is drawn in three steps: an intent (uniformly from ``INTENTS``), one of that
intent's templates, then every ``{slot}`` in the template, each filled from a vocabulary
tuple or a small number-speaking function.  Imperative templates may be wrapped in a
polite frame ("could you ... please"); questions are used as they are.  A minority of
sentences start with the wake phrase ("hey chorus", "okay chorus"), as an assistant's
endpointer sometimes leaves it in the transcript.

Transcripts follow the corpus charset: lowercase ``a-z``, apostrophe and single spaces.
Every number is spelled out the way people say it to an assistant ("seven thirty a m",
"quarter past six", "twenty five percent", "five five five oh one nine two").

Example::

    >>> import random
    >>> sample_sentence(random.Random(0))  # doctest: +SKIP
    'set a timer for forty five seconds'
"""

import random
import re
from collections.abc import Callable

__all__ = ["INTENTS", "number_words", "sample_sentence", "sample_sentences", "spoken_form"]

# ---------------------------------------------------------------------------------------
# Numbers, spoken.

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """Spell a non-negative integer below one million: ``342 -> 'three hundred forty two'``."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: {n} is outside the spoken range 0..999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {_ONES[ones]}"
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = f"{_ONES[hundreds]} hundred"
        return head if rest == 0 else f"{head} {number_words(rest)}"
    thousands, rest = divmod(n, 1000)
    head = f"{number_words(thousands)} thousand"
    return head if rest == 0 else f"{head} {number_words(rest)}"


def _clock_minutes(minute: int) -> str:
    """Minutes as read off a clock: 5 -> 'oh five', 30 -> 'thirty'."""
    return f"oh {_ONES[minute]}" if minute < 10 else number_words(minute)


# ---------------------------------------------------------------------------------------
# Slot fillers that speak numbers.  Each takes the sentence's rng and returns words.


def _percent(rng: random.Random) -> str:
    # Round numbers dominate what people actually ask for; odd values keep the model honest.
    if rng.random() < 0.7:
        return number_words(rng.choice((10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100)))
    return number_words(rng.randint(1, 99))


def _volume_level(rng: random.Random) -> str:
    return number_words(rng.randint(1, 10))


def _duration(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        minutes = rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 55, 90))
        return "one minute" if minutes == 1 else f"{number_words(minutes)} minutes"
    if kind < 0.65:
        seconds = rng.choice((10, 15, 20, 30, 40, 45, 60, 90))
        return f"{number_words(seconds)} seconds"
    if kind < 0.8:
        return rng.choice(("an hour", "half an hour", "an hour and a half", "a minute and a half", "two hours"))
    if kind < 0.9:
        hours = rng.randint(1, 3)
        minute_words = number_words(rng.choice((5, 10, 15, 20, 30, 45)))
        return f"{number_words(hours)} {'hour' if hours == 1 else 'hours'} and {minute_words} minutes"
    minute_words, second_words = number_words(rng.randint(2, 9)), number_words(rng.choice((10, 15, 20, 30, 45)))
    return f"{minute_words} minutes and {second_words} seconds"


def _clock_time(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    style = rng.random()
    if style < 0.35:
        minute = rng.choice((0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 7, 12, 48))
        spoken = "o'clock" if minute == 0 else _clock_minutes(minute)
        return f"{number_words(hour)} {spoken} {rng.choice(('a m', 'p m'))}"
    if style < 0.55:
        relation = rng.choice(("quarter past", "half past", "quarter to", "ten past", "twenty to", "five to"))
        return f"{relation} {number_words(hour)}"
    if style < 0.75:
        return f"{number_words(hour)} {_clock_minutes(rng.choice((5, 10, 15, 20, 30, 40, 45, 50)))}"
    if style < 0.92:
        return f"{number_words(hour)} o'clock"
    return rng.choice(("noon", "midnight", "six in the morning", "nine at night", "five in the evening"))


def _temperature(rng: random.Random) -> str:
    # Fahrenheit-style and Celsius-style households both exist in the population.
    return number_words(rng.randint(62, 78) if rng.random() < 0.5 else rng.randint(16, 26))


def _phone_number(rng: random.Random) -> str:
    digits = [rng.randint(0, 9) for _ in range(rng.choice((7, 10)))]
    zero = rng.choice(("oh", "zero"))
    return " ".join(zero if digit == 0 else _ONES[digit] for digit in digits)


def _two_items(rng: random.Random) -> str:
    first, second = rng.sample(_ITEMS, 2)
    return f"{first} and {second}"


def _count(rng: random.Random) -> str:
    return number_words(rng.choice((2, 2, 3, 4, 5, 6, 10, 12)))


# ---------------------------------------------------------------------------------------
# Slot vocabularies.

_ROOMS = (
    "kitchen",
    "living room",
    "bedroom",
    "bathroom",
    "hallway",
    "office",
    "dining room",
    "garage",
    "basement",
    "nursery",
    "porch",
    "garden",
    "kids room",
    "guest room",
    "study",
    "upstairs",
    "downstairs",
    "attic",
    "laundry room",
    "master bedroom",
)
_COLORS = (
    "red",
    "blue",
    "green",
    "warm white",
    "cool white",
    "purple",
    "orange",
    "pink",
    "yellow",
    "daylight",
    "soft white",
    "teal",
    "candle light",
    "lavender",
)
_ARTISTS = (
    "the beatles",
    "taylor swift",
    "miles davis",
    "bob marley",
    "adele",
    "queen",
    "ed sheeran",
    "nina simone",
    "the rolling stones",
    "prince",
    "coldplay",
    "elton john",
    "fleetwood mac",
    "stevie wonder",
    "billie eilish",
    "dolly parton",
    "drake",
    "abba",
    "johnny cash",
    "aretha franklin",
    "the proclaimers",
    "oasis",
    "arctic monkeys",
    "bruno mars",
    "ella fitzgerald",
    "frank sinatra",
    "lady gaga",
    "radiohead",
    "whitney houston",
    "the clash",
)
_GENRES = (
    "jazz",
    "classical music",
    "reggae",
    "rock",
    "hip hop",
    "country",
    "folk",
    "blues",
    "soul",
    "lo fi beats",
    "pop",
    "heavy metal",
    "calypso",
    "soca",
    "punk",
    "disco",
    "ambient music",
    "piano music",
    "dance music",
    "nineties hits",
    "eighties music",
)
_PLAYLISTS = (
    "my workout playlist",
    "my chill playlist",
    "the dinner party playlist",
    "my road trip mix",
    "the morning playlist",
    "my focus playlist",
    "the kids playlist",
    "my sleep sounds",
    "my liked songs",
    "the party mix",
    "rainy day songs",
)
_RADIO = (
    "the radio",
    "b b c radio two",
    "the news",
    "my podcast",
    "the latest episode",
    "white noise",
    "rain sounds",
)
_CITIES = (
    "london",
    "new york",
    "glasgow",
    "edinburgh",
    "birmingham",
    "manchester",
    "lancaster",
    "kingston",
    "port of spain",
    "bridgetown",
    "boston",
    "chicago",
    "los angeles",
    "seattle",
    "miami",
    "toronto",
    "dublin",
    "paris",
    "berlin",
    "madrid",
    "tokyo",
    "sydney",
    "leeds",
    "liverpool",
    "bristol",
    "cardiff",
    "aberdeen",
    "brooklyn",
    "houston",
    "denver",
    "atlanta",
    "nassau",
    "montreal",
    "wolverhampton",
    "coventry",
)
_DAYS = (
    "today",
    "tomorrow",
    "tonight",
    "this weekend",
    "on monday",
    "on tuesday",
    "on wednesday",
    "on thursday",
    "on friday",
    "on saturday",
    "on sunday",
    "this afternoon",
    "tomorrow morning",
    "next week",
    "this evening",
)
_WEATHER_WORDS = ("rain", "snow", "be sunny", "be windy", "be cold", "be hot", "storm", "be foggy")
_ITEMS = (
    "milk",
    "eggs",
    "bread",
    "butter",
    "apples",
    "bananas",
    "coffee",
    "tea",
    "rice",
    "pasta",
    "tomatoes",
    "onions",
    "garlic",
    "cheese",
    "yogurt",
    "chicken",
    "orange juice",
    "toilet paper",
    "dish soap",
    "laundry detergent",
    "paper towels",
    "olive oil",
    "sugar",
    "flour",
    "cereal",
    "peanut butter",
    "carrots",
    "potatoes",
    "lettuce",
    "batteries",
    "dog food",
    "cat litter",
    "shampoo",
    "toothpaste",
    "lemons",
    "avocados",
    "salmon",
    "beans",
    "plantains",
    "oat milk",
    "ginger",
    "honey",
    "strawberries",
    "spinach",
    "light bulbs",
    "bin bags",
    "crisps",
    "biscuits",
    "sparkling water",
    "nappies",
)
_DISHES = (
    "pasta",
    "rice",
    "eggs",
    "oven",
    "pizza",
    "cake",
    "roast",
    "tea",
    "bread",
    "laundry",
    "kids",
    "parking meter",
)
_LISTS = ("shopping list", "grocery list", "to do list", "list")
_CONTACTS = (
    "mom",
    "dad",
    "grandma",
    "grandpa",
    "my sister",
    "my brother",
    "alice",
    "bob",
    "carlos",
    "dmitri",
    "emma",
    "fatima",
    "george",
    "hannah",
    "isaac",
    "jasmine",
    "kofi",
    "liam",
    "maria",
    "nadia",
    "oliver",
    "priya",
    "quentin",
    "rosa",
    "sean",
    "tariq",
    "uma",
    "victor",
    "wendy",
    "yusuf",
    "zoe",
    "aunt jean",
    "uncle ray",
    "the office",
    "doctor patel",
    "the dentist",
    "my wife",
    "my husband",
    "the babysitter",
    "jamal",
)
_MESSAGES = (
    "i'm running late",
    "i'll be home soon",
    "call me back",
    "dinner is ready",
    "i'm on my way",
    "see you at the station",
    "happy birthday",
    "don't forget the keys",
    "can you pick up the kids",
    "i love you",
    "the meeting is cancelled",
    "running ten minutes late",
    "we're out of milk",
    "leave the door open",
)
_TASKS = (
    "take my medicine",
    "call the doctor",
    "water the plants",
    "feed the cat",
    "walk the dog",
    "pay the electric bill",
    "take out the bins",
    "pick up the kids",
    "buy a birthday card",
    "check the oven",
    "move the car",
    "book a haircut",
    "charge my phone",
    "lock the back door",
    "send the report",
    "renew my passport",
    "put the washing out",
    "defrost the chicken",
)
_DEVICES = (
    "t v",
    "fan",
    "heater",
    "coffee machine",
    "radio",
    "air conditioning",
    "kettle",
    "dishwasher",
    "robot vacuum",
)
_ON_OFF = ("on", "off")
_WAKE = ("", "", "", "hey chorus ", "okay chorus ", "chorus ")
_POLITE_FRAMES = (
    "{}",
    "{}",
    "{}",
    "please {}",
    "{} please",
    "could you {}",
    "can you {}",
    "would you {}",
    "i want you to {}",
)

_SLOTS: dict[str, tuple[str, ...] | Callable[[random.Random], str]] = {
    "room": _ROOMS,
    "color": _COLORS,
    "on_off": _ON_OFF,
    "artist": _ARTISTS,
    "genre": _GENRES,
    "playlist": _PLAYLISTS,
    "radio": _RADIO,
    "city": _CITIES,
    "day": _DAYS,
    "weather_word": _WEATHER_WORDS,
    "item": _ITEMS,
    "two_items": _two_items,
    "dish": _DISHES,
    "list": _LISTS,
    "contact": _CONTACTS,
    "message": _MESSAGES,
    "task": _TASKS,
    "device": _DEVICES,
    "percent": _percent,
    "level": _volume_level,
    "duration": _duration,
    "time": _clock_time,
    "temperature": _temperature,
    "phone_number": _phone_number,
    "count": _count,
}

# ---------------------------------------------------------------------------------------
# Templates.  Imperatives may be wrapped in a polite frame; questions are used verbatim.

_COMMANDS: dict[str, tuple[str, ...]] = {
    "lights": (
        "turn {on_off} the {room} lights",
        "turn the {room} lights {on_off}",
        "switch {on_off} the lights in the {room}",
        "dim the {room} lights to {percent} percent",
        "set the {room} lights to {percent} percent",
        "brighten the {room} to {percent} percent",
        "set the {room} lights to {color}",
        "change the lights in the {room} to {color}",
        "make the {room} lights {color}",
        "turn all the lights {on_off}",
        "turn {on_off} the {device}",
        "switch the {device} {on_off}",
    ),
    "timer": (
        "set a timer for {duration}",
        "start a timer for {duration}",
        "time the {dish} for {duration}",
        "add {duration} to the timer",
        "cancel the timer",
        "pause the {dish} timer",
        "set a timer for the {dish}",
    ),
    "alarm": (
        "set an alarm for {time}",
        "wake me up at {time}",
        "wake me up at {time} {day}",
        "set an alarm for {time} {day}",
        "change my alarm to {time}",
        "cancel my alarm for {time}",
        "snooze the alarm for {duration}",
    ),
    "music": (
        "play {artist}",
        "play some {genre}",
        "play {playlist}",
        "play {genre} in the {room}",
        "play {artist} in the {room}",
        "put on {radio}",
        "shuffle {playlist}",
        "skip this song",
        "play the next song",
        "play something by {artist}",
        "pause the music",
    ),
    "volume": (
        "turn the volume up",
        "turn it down",
        "set the volume to {level}",
        "volume {level}",
        "set the volume to {percent} percent",
        "turn the volume down to {level}",
        "mute the {room} speaker",
    ),
    "weather": (
        "tell me the weather in {city} {day}",
        "give me the forecast for {city}",
        "show me the weather {day}",
    ),
    "shopping": (
        "add {item} to my {list}",
        "add {two_items} to the {list}",
        "put {count} {item} on my {list}",
        "remove {item} from my {list}",
        "take {item} off the {list}",
        "clear my {list}",
        "read my {list}",
    ),
    "call": (
        "call {contact}",
        "call {contact} on speaker",
        "ring {contact}",
        "dial {phone_number}",
        "call {phone_number}",
        "video call {contact}",
        "hang up",
    ),
    "message": (
        "send a message to {contact} saying {message}",
        "text {contact} {message}",
        "tell {contact} {message}",
        "message {contact} that {message}",
        "read my messages from {contact}",
        "reply {message}",
    ),
    "reminder": (
        "remind me to {task} at {time}",
        "remind me to {task} {day}",
        "remind me to {task} in {duration}",
        "set a reminder to {task} {day} at {time}",
        "remind me at {time} to {task}",
        "delete the reminder to {task}",
    ),
    "thermostat": (
        "set the thermostat to {temperature} degrees",
        "set the {room} to {temperature} degrees",
        "turn the heating up to {temperature}",
        "turn the heat down to {temperature} degrees",
        "turn the heating {on_off}",
        "make it warmer in the {room}",
        "make the {room} cooler",
        "turn the air conditioning {on_off}",
        "set the heating to eco mode",
    ),
}

_QUESTIONS: dict[str, tuple[str, ...]] = {
    "lights": ("are the {room} lights on", "did i leave the {room} lights on"),
    "timer": ("how long is left on the timer", "how much time is left on the {dish} timer"),
    "alarm": ("what time is my alarm {day}", "is my alarm set for {time}"),
    "music": ("what song is this", "who sings this song"),
    "volume": ("what's the volume",),
    "weather": (
        "what's the weather in {city} {day}",
        "what's the weather like {day}",
        "will it {weather_word} in {city} {day}",
        "will it {weather_word} {day}",
        "how hot will it be in {city} {day}",
        "what's the temperature in {city}",
        "do i need an umbrella {day}",
        "is it going to {weather_word} {day}",
    ),
    "shopping": ("what's on my {list}", "is {item} on my {list}"),
    "call": ("who called me {day}", "what's {contact}'s number"),
    "message": ("do i have any new messages", "did {contact} text me"),
    "reminder": ("what are my reminders for {day}", "what do i have {day}"),
    "thermostat": (
        "what's the temperature in the {room}",
        "what's the thermostat set to",
        "is the heating on",
    ),
}

INTENTS: tuple[str, ...] = tuple(_COMMANDS)

_SLOT_PATTERN = re.compile(r"\{(\w+)\}")
_TRANSCRIPT_CHARSET = re.compile(r"[a-z' ]+")
# How often an intent speaks as a question rather than a command.
_QUESTION_PROBABILITY = 0.25


def _fill_slot(name: str, rng: random.Random) -> str:
    source = _SLOTS[name]
    return rng.choice(source) if isinstance(source, tuple) else source(rng)


def sample_sentence(rng: random.Random) -> str:
    """Draw one transcript (lowercase ``a-z``, apostrophes, single spaces) using ``rng``."""
    intent = rng.choice(INTENTS)
    if rng.random() < _QUESTION_PROBABILITY:
        sentence = rng.choice(_QUESTIONS[intent])
    else:
        sentence = rng.choice(_POLITE_FRAMES).format(rng.choice(_COMMANDS[intent]))
    sentence = rng.choice(_WAKE) + sentence
    sentence = _SLOT_PATTERN.sub(lambda match: _fill_slot(match.group(1), rng), sentence)
    sentence = " ".join(sentence.split())
    if not _TRANSCRIPT_CHARSET.fullmatch(sentence):
        raise ValueError(f"grammar produced a transcript outside [a-z' ]: {sentence!r} (intent {intent})")
    return sentence


def sample_sentences(n: int, seed: int) -> list[str]:
    """Draw ``n`` transcripts; the same ``(n, seed)`` always gives the same list."""
    if n < 0:
        raise ValueError(f"sample_sentences: n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [sample_sentence(rng) for _ in range(n)]


# Letters that the transcript spells as separate words but a TTS engine must read as an
# abbreviation: espeak-ng says "a m" as "uh em" and "a.m." as "ay em".
_TTS_ABBREVIATIONS = {"a m": "a.m.", "p m": "p.m."}
_TTS_ABBREVIATION_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, _TTS_ABBREVIATIONS)) + r")\b")


def spoken_form(sentence: str) -> str:
    """The text to give a TTS engine so that it says ``sentence`` as its transcript reads."""
    return _TTS_ABBREVIATION_PATTERN.sub(lambda match: _TTS_ABBREVIATIONS[match.group(1)], sentence)
