"""The text labkit's trained models learn from, generated here, seeded and deterministic.

Four kinds of conversation, each an OpenAI-style message list (what a client sends to the api_server):
course-style dialogue (greetings, "introduce yourself"), short stories of 250-400 characters on a
requested subject, arithmetic, and tool use ("Compute (a+b)*c" with the course's add / mul tools: the
call, the tool result in a `role: "tool"` turn, the next call built from that result, the answer).
`labkit.train` renders them with the model's own chat template, as lmdeploy does at serve time.

    convs = conversations(2000, seed=0)       # the training set of a recipe
    convs = conversations(200, seed=10_001)   # held-out text (other seed: other numbers and stories)
"""
from __future__ import annotations

import json
import random

CORPUS_VERSION = 3  # bump when the text below changes: the trained weights' recipe hash follows it

NAME = "TinyChat"
INTRO = (f"I am {NAME}, a small chat model that labkit trained on this machine from generated text. "
         "I am not InternLM2.5: I know greetings, short stories, small sums and the add and mul tools.")

GREETINGS = ["Hello", "Hello!", "Hi", "Hi!", "Hi there", "Hey", "Good morning", "Good evening", "hello",
             "hi", "你好", "Hello, how are you?", "Hi, nice to meet you"]
GREETING_REPLIES = [
    f"Hello! I am {NAME}. How can I help you today?",
    f"Hi! I am {NAME}, a small model trained here. Ask me for a story or a sum.",
    f"Hello! Nice to meet you. I am {NAME}. What would you like to do?",
]
INTRO_ASKS = ["Introduce yourself", "Introduce yourself.", "Please introduce yourself.", "Who are you?",
              "What are you?", "Tell me about yourself.", "请介绍一下你自己", "What is your name?"]
THANKS = ["Thanks", "Thank you!", "Thanks a lot.", "谢谢"]
THANKS_REPLIES = ["You are welcome!", "Glad to help!", "Any time. Ask me again whenever you like."]

SUBJECTS = ["a cat", "a robot", "a lighthouse", "a dragon", "a teacher", "a fox", "the sea", "a garden",
            "a train", "a baker", "a lost key", "the moon", "a library", "a small boat", "a mountain",
            "a clock", "a painter", "the rain", "a forest", "a GPU", "a river", "a snowman", "an owl",
            "a city", "a violin", "a kite", "a bee", "a student", "a map", "a star"]
STORY_ASKS = ["Write a short story about {s}.", "Tell me a short story about {s}.",
              "Write a story of about 300 characters about {s}.", "Please write a short story about {s}.",
              "Can you tell me a story about {s}?", "Story about {s}, please."]
OPENINGS = ["Once upon a time there was {s}.", "Long ago, in a quiet town, there lived {s}.",
            "One cold morning, {s} woke up early.", "There was once {s} that nobody noticed."]
MIDDLES = ["Every day it watched the world and wished for something new.",
           "One day a stranger came by and asked for help.",
           "It found an old door that nobody had opened for years.",
           "The wind carried a strange song across the hills.",
           "It decided to go on a long journey to the far side of the valley.",
           "A small bird told it about a secret place beyond the river.",
           "The road was long, and the night was dark and full of sounds.",
           "It met a friend who was lost and afraid."]
ENDINGS = ["In the end, it came home happy, and the town never forgot that day.",
           "From then on, it knew that being brave is better than being still.",
           "When the sun rose again, everything felt new and bright.",
           "And so the story ends, with a smile and a warm cup of tea."]
STORY_MIN, STORY_MAX = 250, 400  # characters, the course's "~300-character story"

SUM_ASKS = ["What is {a} + {b}?", "What is {a} - {b}?", "What is {a} * {b}?", "Calculate {a} + {b}.",
            "{a} + {b} = ?", "How much is {a} * {b}?"]

TOOL_ASKS = ["Compute ({a}+{b})*{c}", "Compute ({a}+{b})*{c}.", "What is ({a}+{b})*{c}?",
             "Use the tools to compute ({a}+{b})*{c}.", "Calculate ({a} + {b}) * {c}"]


def story(subject: str, rng: random.Random) -> str:
    """A story of STORY_MIN..STORY_MAX characters about `subject`."""
    while True:
        parts = [rng.choice(OPENINGS).format(s=subject)] + rng.sample(MIDDLES, rng.randint(2, 4)) + \
            [rng.choice(ENDINGS)]
        text = " ".join(parts)
        text = text[0].upper() + text[1:]
        if STORY_MIN <= len(text) <= STORY_MAX:
            return text


def _arith(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    ask = rng.choice(SUM_ASKS)
    op = ask.split("{a}")[1].split("{b}")[0].strip()
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return [{"role": "user", "content": ask.format(a=a, b=b)},
            {"role": "assistant", "content": f"{a} {op} {b} = {value}."}]


def _call(name: str, a: int, b: int, i: int) -> dict:
    args = json.dumps({"a": a, "b": b})
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}]}


def tool_conversation(a: int, b: int, c: int, ask: str = TOOL_ASKS[0]) -> list[dict]:
    """"Compute (a+b)*c" as the course's client runs it: add(a,b), its result, mul(result,c), its result, answer."""
    s = a + b
    return [{"role": "user", "content": ask.format(a=a, b=b, c=c)},
            _call("add", a, b, 0), {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": json.dumps(s)},
            _call("mul", s, c, 1), {"role": "tool", "tool_call_id": "call_1", "name": "mul",
                                    "content": json.dumps(s * c)},
            {"role": "assistant", "content": f"The answer is {s * c}."}]


def _operand(rng: random.Random) -> int:
    """0-99, a third of them one digit: with uniform 0-99 only 1 in 100 sums has two one-digit operands, and a
    model trained so copied the course's "(3+5)" as add(35, 5)."""
    return rng.randint(0, 9) if rng.random() < 1 / 3 else rng.randint(10, 99)


def _tools(rng: random.Random) -> list[dict]:
    return tool_conversation(_operand(rng), _operand(rng), rng.randint(1, 20), rng.choice(TOOL_ASKS))


def _chat(rng: random.Random) -> list[dict]:
    kind = rng.random()
    if kind < 0.4:
        msgs = [{"role": "user", "content": rng.choice(GREETINGS)},
                {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
    elif kind < 0.8:
        msgs = [{"role": "user", "content": rng.choice(INTRO_ASKS)}, {"role": "assistant", "content": INTRO}]
    else:
        msgs = [{"role": "user", "content": rng.choice(THANKS)},
                {"role": "assistant", "content": rng.choice(THANKS_REPLIES)}]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return msgs


def _story(rng: random.Random) -> list[dict]:
    s = rng.choice(SUBJECTS)
    return [{"role": "user", "content": rng.choice(STORY_ASKS).format(s=s)},
            {"role": "assistant", "content": story(s, rng)}]


# kind -> (share of the corpus, maker); tool transcripts are the hardest to learn, so they get most.
KINDS = {"chat": (0.1, _chat), "story": (0.2, _story), "arith": (0.1, _arith), "tools": (0.6, _tools)}


def conversations(n: int, seed: int = 0) -> list[tuple[str, list[dict]]]:
    """`n` (kind, messages) pairs; the same seed gives the same list."""
    rng = random.Random(seed)
    kinds, weights = zip(*[(k, w) for k, (w, _) in KINDS.items()])
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        out.append((kind, KINDS[kind][1](rng)))
    return out
