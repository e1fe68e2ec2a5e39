"""The smallest function: a greeting. Its snapshot is the runtime's own baseline cost."""

GREETING = "Hello"
_greeting_state = b""


def init():
    global _greeting_state
    _greeting_state = GREETING.encode()


def handle(input):
    name = input.get("name", "world")
    if not isinstance(name, str):
        raise ValueError("name must be a string")
    return {"message": f"{GREETING}, {name}!"}


def state():
    return _greeting_state


def check(input, output):
    expected = f"{GREETING}, {input.get('name', 'world')}!"
    return [] if output.get("message") == expected else [f"message {output.get('message')!r} != {expected!r}"]
