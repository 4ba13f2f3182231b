"""Customer questions the bot never saw, one per topic, phrased unlike any training frame, with the words
an on-topic reply must contain (any one of them, case-insensitively)."""

HELD_OUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("My package still hasn't shown up. Where is it?", ("track",)),
    ("The blender I got is cracked. Could I have a refund?", ("refund",)),
    ("What do you charge for shipping to my area?", ("shipping", "delivery")),
    ("These shoes are too small. How can I return them?", ("return",)),
    ("Help, I cannot remember the password for my account!", ("password", "reset")),
    ("Until what time are you open on Saturday?", ("open", " pm")),
    ("I would rather speak with a human agent.", ("agent", "human")),
    ("I changed my mind and need to cancel the order I placed this morning.", ("cancel",)),
    ("Is it possible to pay by PayPal?", ("paypal", "visa")),
    ("How can I update the email address on my profile?", ("settings",)),
)

# A second question that only makes sense after the first; the reply must name the first turn's topic.
TWO_TURNS = (
    "The toaster I bought burns everything, I want a refund.",
    "Okay. How long will that take?",
    ("refund", "5 to 7"),
)


def on_topic(reply: str, keywords: tuple[str, ...]) -> bool:
    return any(k in reply.lower() for k in keywords)
