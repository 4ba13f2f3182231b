"""Customer-service dialogues generated from templates and a seed: the demo bot's whole training set.

Each topic has many paraphrase frames for the customer and one fixed answer, so greedy decoding gives a
clean reply once the model recognises the topic; prefixes, suffixes, items and casing vary around the
frames so that unseen phrasings of the same request generalise. Follow-up questions ("how long will that
take?") have one answer per topic, so the model must read the earlier turn to answer them.
"""

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

Message = dict[str, str]

SYSTEM_PROMPTS = (
    "You are the Meshmart customer service assistant.",
    "You are a helpful support agent for Meshmart, an online shop.",
    "Answer customer questions about Meshmart orders, shipping, returns and accounts.",
)

ITEMS = (
    "kettle", "jacket", "headphones", "lamp", "backpack", "phone case", "mug", "sneakers", "camera",
    "toaster", "desk chair", "water bottle", "keyboard", "sweater", "frying pan", "watch", "rug", "tent",
)  # fmt: skip

GREETINGS = ("", "", "", "Hi, ", "Hello, ", "Hey, ", "Hi there! ", "Good morning. ", "Hello! ", "Excuse me, ")
CLOSINGS = ("", "", "", "", " Thanks.", " Thank you!", " Please help.", " Thanks in advance.")

# Kinds of follow-up question, each answered per topic.
FOLLOW_UPS = {
    "duration": (
        "and how long will that take?", "How long does that take?", "how long until that's done?",
        "How many days will it take?", "When will that happen?", "how soon?", "And how long is that?",
        "ok, how long does it usually take?",
    ),
    "cost": (
        "How much does that cost?", "is that free?", "Do I have to pay for that?", "what's the fee?",
        "Is there a charge for that?", "and does it cost anything?",
    ),
    "needs": (
        "What do I need for that?", "do I need the receipt?", "What do I need to have ready?",
        "Is there anything I need to do first?", "what information do you need?",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Topic:
    name: str
    frames: tuple[str, ...]  # customer phrasings; {item} is filled from ITEMS
    answer: str
    follow_ups: dict[str, str] = field(default_factory=dict)  # follow-up kind -> answer


TOPICS = (
    Topic(
        "order_status",
        (
            "where is my order?", "where's my {item}?", "my order hasn't arrived yet.", "has my order shipped?",
            "can you check the status of my order?", "I ordered a {item} last week and it's still not here.",
            "I'm still waiting for my {item}.", "how do I track my package?", "what's happening with my order?",
            "my {item} never arrived.", "is my order on its way?", "I can't find my tracking number.",
            "the tracking for my {item} hasn't updated.", "when will my order get here?",
        ),
        "You can track your order under Orders in your account. Tracking updates within 24 hours of dispatch. "
        "If it has not moved in 3 days, I can open a ticket for you.",
        {
            "duration": "Most orders arrive within 3 to 5 business days of dispatch.",
            "needs": "Just your order number, which is in your confirmation email.",
        },
    ),
    Topic(
        "refund",
        (
            "I want a refund for my {item}.", "can I get my money back for the {item}?", "how do I get a refund?",
            "the {item} arrived broken, I want a refund.", "please refund my order.",
            "I was charged twice, I need a refund.", "I'd like a refund please.", "refund my {item}.",
            "the {item} is damaged, can you refund me?", "I want my money back.", "can you issue a refund?",
            "my {item} stopped working after a day, I need a refund.",
        ),
        "I'm sorry about that. I have started a refund to your original payment method. "
        "You will get an email confirmation shortly.",
        {
            "duration": "Refunds reach your original payment method within 5 to 7 business days.",
            "cost": "Refunds are free; we never charge a fee for them.",
            "needs": "Just your order number; no receipt is needed for a refund.",
        },
    ),
    Topic(
        "shipping",
        (
            "how much is shipping?", "what are your delivery options?", "do you offer express shipping?",
            "how fast is delivery?", "do you ship internationally?", "what does delivery cost?",
            "is shipping free?", "can I get my {item} delivered tomorrow?", "which shipping methods do you have?",
            "do you deliver on weekends?", "what are the shipping costs for a {item}?",
        ),
        "Standard shipping is free on orders over 50 dollars and takes 3 to 5 business days. "
        "Express shipping costs 9 dollars and takes 1 to 2 business days.",
        {
            "duration": "Standard delivery takes 3 to 5 business days, and express delivery takes 1 to 2.",
            "cost": "Standard shipping is free over 50 dollars; express shipping is 9 dollars.",
        },
    ),
    Topic(
        "returns",
        (
            "how do I return my {item}?", "can I send back the {item}?", "what's your return policy?",
            "the {item} doesn't fit, can I return it?", "I want to return an item.",
            "I'd like to exchange my {item} for another size.", "can I return something I bought online?",
            "I don't like the {item}, can I send it back?", "how do returns work?",
            "is it too late to return my {item}?",
        ),
        "You can return any item within 30 days. Go to Orders, choose the item and print the free return "
        "label, then drop the parcel at any post office.",
        {
            "duration": "Once we receive your return, we process it within 3 business days.",
            "cost": "Returns are free with the prepaid return label.",
            "needs": "Just the item in its original packaging and the printed return label.",
        },
    ),
    Topic(
        "password",
        (
            "I forgot my password.", "I can't log in.", "how do I reset my password?",
            "I'm locked out of my account.", "my login doesn't work.", "I need a new password.",
            "the site says my password is wrong.", "can you help me sign in?", "I can't access my account.",
            "how can I change my password?",
        ),
        "Click Forgot password on the sign-in page and we will email you a reset link. "
        "The link is valid for one hour.",
        {
            "duration": "The reset email usually arrives within a few minutes; check your spam folder too.",
            "needs": "Just access to the email address on your account.",
        },
    ),
    Topic(
        "account",
        (
            "how do I change my email address?", "I moved, how do I update my address?",
            "can I change the phone number on my account?", "how do I edit my account details?",
            "where can I update my shipping address?", "how do I delete my account?",
            "I want to change the name on my account.", "how do I unsubscribe from your emails?",
        ),
        "You can change your email, address, phone number and newsletter choices under Account Settings. "
        "Changes are saved right away.",
        {"cost": "Changing your account details is free."},
    ),
    Topic(
        "hours",
        (
            "what are your opening hours?", "when are you open?", "are you open on Sunday?",
            "what time does the store close?", "is the shop open on weekends?", "what time do you open?",
            "are you open today?", "when does the store open on Saturday?", "what are your store hours?",
        ),
        "Our stores are open Monday to Saturday from 9 am to 8 pm, and Sunday from 10 am to 6 pm. "
        "The online shop is open around the clock.",
    ),
    Topic(
        "human",
        (
            "I want to talk to a human.", "can I speak to a real person?", "connect me to an agent.",
            "this isn't helping, get me a manager.", "let me talk to someone.", "is there a person I can talk to?",
            "I need to speak with customer service.", "transfer me to an agent please.", "are you a bot?",
        ),
        "Of course. I am connecting you to a human agent now; the current wait time is about 5 minutes.",
        {"duration": "The current wait for an agent is about 5 minutes."},
    ),
    Topic(
        "cancel",
        (
            "I want to cancel my order.", "can I cancel the {item} I just ordered?", "please cancel my purchase.",
            "how do I cancel an order?", "I ordered the wrong {item}, can I cancel it?",
            "stop my order please.", "I'd like to cancel my order for a {item}.",
        ),
        "Orders can be cancelled within 2 hours of purchase under Orders in your account. "
        "After that, you can return the item once it arrives.",
        {
            "duration": "Cancelling is immediate, and the money is back within 5 to 7 business days.",
            "cost": "Cancelling an order is free.",
        },
    ),
    Topic(
        "payment",
        (
            "what payment methods do you accept?", "can I pay with PayPal?", "do you take credit cards?",
            "how can I pay for my {item}?", "can I use a gift card?", "do you accept Apple Pay?",
            "which cards do you take?", "can I pay in cash?",
        ),
        "We accept Visa, Mastercard, American Express, PayPal and Meshmart gift cards.",
    ),
    Topic(
        "greeting",
        ("hi", "hello", "hey there", "good morning", "what can you do?", "who are you?", "can you help me?"),
        "Hello! I am the Meshmart assistant. I can help with orders, refunds, shipping, returns, "
        "your account and store hours. What can I do for you?",
    ),
    Topic(
        "thanks",
        ("thanks!", "thank you so much.", "that's all, thanks.", "great, thank you.", "perfect, thanks.", "ok thanks"),
        "You're welcome! Is there anything else I can help with?",
    ),
    Topic(
        "out_of_scope",
        (
            "what's the weather like?", "tell me a joke.", "who won the game last night?",
            "can you write my homework?", "what is the meaning of life?", "recommend a movie.",
        ),
        "I'm sorry, I can only help with Meshmart orders, shipping, returns, payments and accounts.",
    ),
)  # fmt: skip

_BY_NAME = {t.name: t for t in TOPICS}
_NO_GREETING = {"greeting", "thanks"}


def topic(name: str) -> Topic:
    return _BY_NAME[name]


def _vary_case(text: str, rng: random.Random) -> str:
    """Customers type carelessly: sentence case, all lower case, or a missing final punctuation mark."""
    roll = rng.random()
    if roll < 0.6:
        text = text[0].upper() + text[1:]
    elif roll < 0.7:
        text = text.lower()
    if rng.random() < 0.2 and text[-1] in ".?!":
        text = text[:-1]
    return text


def _question(t: Topic, rng: random.Random, opening: bool) -> str:
    text = rng.choice(t.frames).replace("{item}", rng.choice(ITEMS))
    text = _vary_case(text, rng)
    if opening and t.name not in _NO_GREETING:
        text = rng.choice(GREETINGS) + (text[0].lower() + text[1:] if rng.random() < 0.5 else text)
        text += rng.choice(CLOSINGS) if t.name != "thanks" else ""
    return text


def _follow_up(t: Topic, rng: random.Random) -> tuple[str, str] | None:
    if not t.follow_ups:
        return None
    kind = rng.choice(sorted(t.follow_ups))
    return _vary_case(rng.choice(FOLLOW_UPS[kind]), rng), t.follow_ups[kind]


def dialogue(rng: random.Random) -> list[Message]:
    """One conversation: a request, perhaps follow-ups about it, perhaps a second request and a thank-you."""
    messages: list[Message] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    first = rng.choice(TOPICS)
    topics = [first]
    if rng.random() < 0.3:
        topics.append(rng.choice([t for t in TOPICS if t.name not in ("greeting", first.name)]))
    for i, t in enumerate(topics):
        messages += [
            {"role": "user", "content": _question(t, rng, opening=i == 0)},
            {"role": "assistant", "content": t.answer},
        ]
        for _ in range(2 if rng.random() < 0.2 else 1):
            if rng.random() < 0.5 and (follow := _follow_up(t, rng)):
                messages += [{"role": "user", "content": follow[0]}, {"role": "assistant", "content": follow[1]}]
    if rng.random() < 0.15 and topics[-1].name != "thanks":
        messages += [
            {"role": "user", "content": _question(topic("thanks"), rng, opening=False)},
            {"role": "assistant", "content": topic("thanks").answer},
        ]
    return messages


def dialogues(count: int, seed: int = 0) -> Iterator[list[Message]]:
    """`count` dialogues, the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        yield dialogue(rng)
