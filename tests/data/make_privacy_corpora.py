"""Writes the sanitizer's measurement corpora (deterministic): `python tests/data/make_privacy_corpora.py`.

- privacy_tuning.jsonl: the corpus the rules were tuned on (templates "A", names drawn from Faker's lists);
- privacy_dev.jsonl: written as a held-out set (templates "B", hand-picked names), but its misses were looked at
  and fixed once, so it counts as tuning data now;
- privacy_heldout.jsonl: written after the rules were frozen and never tuned on: templates "C", other value
  formats, other hand-picked names, other phrasings (see heldout_rows_c);
- domain_ids.jsonl: texts whose lot/part/order/version codes, production dates, serials and measurements must
  survive, with no personal data at all.
Each row: {"text", "values": [{"kind", "value"}], "keep": [...]}; every value and keep string occurs in the text.
"""
from __future__ import annotations

import base64
import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALNUM = string.ascii_letters + string.digits


# --- value makers ---------------------------------------------------------------------------------------------
def rand(rng: random.Random, n: int, chars: str = ALNUM) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def iban(country: str, bban: str) -> str:
    rotated = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in rotated)) % 97
    return f"{country}{check:02d}{bban}"


def grouped(value: str, size: int = 4, sep: str = " ") -> str:
    return sep.join(value[i : i + size] for i in range(0, len(value), size))


def jwt(rng: random.Random) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    payload = {"sub": str(rng.randint(1000, 99999)), "iat": rng.randint(1600000000, 1800000000), "role": "user"}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.{rand(rng, 43, ALNUM + '-_')}"


def private_key(rng: random.Random, kind: str) -> str:
    lines = [rand(rng, 64, ALNUM + "+/") for _ in range(rng.randint(3, 6))]
    return f"-----BEGIN {kind}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {kind}PRIVATE KEY-----"


def ssn(rng: random.Random) -> str:
    return f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"


def nanp(rng: random.Random, style: int) -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 989), rng.randint(1000, 9999)
    return [f"{a}-{b}-{c}", f"({a}) {b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", f"{a}{b}{c}",
            f"+1-{a}-{b}-{c}"][style % 6]


def dni(rng: random.Random) -> str:
    n = rng.randint(10000000, 99999999)
    return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"


def cpf(rng: random.Random) -> str:
    digits = [rng.randint(0, 9) for _ in range(9)]
    for n in (9, 10):
        digits.append(sum(d * w for d, w in zip(digits, range(n + 1, 1, -1))) * 10 % 11 % 10)
    s = "".join(map(str, digits))
    return f"{s[:3]}.{s[3:6]}.{s[6:9]}-{s[9:]}"


def nino(rng: random.Random) -> str:
    return f"{rng.choice('ABCEGHJKLMNPRSTWXYZ')}{rng.choice('ABCEGHJKLMNPRSTWXYZ')} {rng.randint(10, 99)} " \
           f"{rng.randint(10, 99)} {rng.randint(10, 99)} {rng.choice('ABCD')}"


# --- names ----------------------------------------------------------------------------------------------------
def faker_names(rng: random.Random, count: int) -> list[str]:
    from faker import Faker

    locales = ["en_US", "en_GB", "yo_NG", "ig_NG", "zu_ZA", "en_KE", "hi_IN", "en_IN", "vi_VN", "tr_TR", "es_MX",
               "pt_BR", "fr_FR", "de_DE", "pl_PL", "ar_SA", "fa_IR", "id_ID", "th_TH", "sw"]
    names = []
    for i in range(count):
        fake = Faker(locales[i % len(locales)])
        fake.seed_instance(rng.randint(0, 10**9))
        names.append(f"{fake.first_name()} {fake.last_name()}")
    return names


# Hand-picked, many in no list the sanitizer reads: held-out only.
HELDOUT_NAMES = [
    "Chukwuemeka Obi", "Folasade Ogunleye", "Tendai Mutasa", "Amara Nwosu", "Kwabena Asante", "Thandiwe Dlamini",
    "Oluwaseun Bakare", "Zanele Khumalo", "Adaeze Eze", "Kofi Boateng", "Yusuf Abdullahi", "Nkechi Uchenna",
    "Takumi Nakagawa", "Haruka Fujimoto", "Ravi Shankaran", "Anjali Venkatesh", "Siddharth Iyer", "Meera Pillai",
    "Nguyen Van Minh", "Tran Thi Hoa", "Bui Quang Huy", "Somchai Wongsakul", "Arjun Balasubramanian",
    "Xiong Mei", "Zhao Lei", "Liang Qiuyue", "Hyun-woo Jang", "Seo-yeon Park", "Dong-hyun Kwon",
    "Mateusz Wróblewski", "Zofia Kaczmarek", "Björn Lindqvist", "Astrid Halvorsen", "Siobhán Ní Bhriain",
    "Eoghan Mac Cárthaigh", "Niamh O'Sullivan", "Giulia Bertolucci", "Matteo Ferraro", "Inês Carvalho",
    "João Figueiredo", "Lucía Etxeberria", "Íñigo Arrizabalaga", "Dagny Solberg", "Priyanka Chaturvedi",
    "Farhan Qureshi", "Ayesha Siddiqui", "Mehmet Öztürk", "Elif Karataş", "Reza Mohammadi", "Leila Farahani",
    "Tomasz Zieliński", "Ewa Dąbrowska", "Kalani Kahananui", "Wiremu Tane", "Aroha Ngata", "Bolat Nurlanov",
    "Gulnara Sadykova", "Ahmed El-Sayed", "Fatima Zahra Benali", "Imani Mwangi",
]
HELDOUT_SCRIPT_NAMES = ["이서연", "박지훈", "최유진", "王芳", "李娜", "张伟", "Ольга Смирнова", "Дмитрий Козлов",
                        "Анна Кузнецова", "Γιώργος Παπαδόπουλος", "Σοφία Νικολάου", "高橋 健太"]
TUNING_SCRIPT_NAMES = ["김민준", "정수빈", "刘洋", "陈静", "Иван Петров", "Мария Соколова", "Νίκος Γεωργίου",
                       "佐藤 花子"]


# --- tuning templates -----------------------------------------------------------------------------------------
def tuning_rows(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    add = lambda text, values, keep=(): rows.append(row(text, values, keep))  # noqa: E731
    for name in faker_names(rng, 120):
        first = name.split()[0]
        style = rng.randint(0, 9)
        if style == 0:
            add(f"Hi, my name is {name.lower()} and I run the press line.", [("PERSON", name.lower())])
        elif style == 1:
            lot = f"LOT A-{rng.randint(1, 99)}"
            add(f"MY NAME IS {name.upper()}, PLEASE CHECK {lot}", [("PERSON", name.upper())], [lot])
        elif style == 2:
            add(f"Please ask {name} about the torque spec.", [("PERSON", name)])
        elif style == 3:
            add(f"{name} approved the change yesterday.", [("PERSON", name)])
        elif style == 4:
            add(f"Thanks for the help. Signed, {name}", [("PERSON", name)])
        elif style == 5:
            add(f"I'm {name}, the new shift lead.", [("PERSON", name)])
        elif style == 6:
            add(f"can you call {first.lower()} before noon", [("PERSON", first.lower())])
        elif style == 7:
            add(f"Loop in {name} on ticket 4521.", [("PERSON", name)], ["ticket 4521"])
        elif style == 8:
            add(f"i spoke with {name.lower()} yesterday about the oven", [("PERSON", name.lower())])
        else:
            add(f"Dear {name}, the report is attached.", [("PERSON", name)])
    for name in TUNING_SCRIPT_NAMES:
        add(f"{name} will check PX-3301 tomorrow.", [("PERSON", name)], ["PX-3301"])
        add(f"Please send the drawings to {name}.", [("PERSON", name)])
    for i in range(40):
        add(*secret_tuning(rng, i))
    for i in range(60):
        add(*pii_tuning(rng, i))
    return rows


def secret_tuning(rng: random.Random, i: int) -> tuple:
    k = i % 20
    if k == 0:
        v = f"sk-proj-{rand(rng, 48, ALNUM + '_-')}"
        return f"my openai key is {v}, is that ok to share?", [("API_KEY", v)]
    if k == 1:
        v = f"github_pat_{rand(rng, 22)}_{rand(rng, 59)}"
        return f"git push fails with token {v}", [("API_KEY", v)]
    if k == 2:
        v = f"ghp_{rand(rng, 36)}"
        return f"export GITHUB_TOKEN={v}", [("API_KEY", v)]
    if k == 3:
        v = f"xoxb-{rng.randint(10**11, 10**12)}-{rng.randint(10**12, 10**13)}-{rand(rng, 24)}"
        return f"Slack bot token: {v}", [("API_KEY", v)]
    if k == 4:
        v = f"hf_{rand(rng, 34)}"
        return f"huggingface-cli login --token {v}", [("API_KEY", v)]
    if k == 5:
        v = f"sk_live_{rand(rng, 24)}"
        return f"stripe.api_key = \"{v}\"", [("API_KEY", v)]
    if k == 6:
        v = f"AIza{rand(rng, 35, ALNUM + '_-')}"
        return f"the maps key AIza one: {v}", [("API_KEY", v)]
    if k == 7:
        key, secret = "AKIA" + rand(rng, 16, string.ascii_uppercase + string.digits), rand(rng, 40, ALNUM + "/+")
        return f"aws_access_key_id={key}\naws_secret_access_key={secret}", [("API_KEY", key), ("SECRET", secret)]
    if k == 8:
        v = jwt(rng)
        return f"The API returns {v} as the session", [("ACCESS_TOKEN", v)]
    if k == 9:
        v = private_key(rng, "RSA ")
        return f"here is the deploy key:\n{v}\nwhy does ssh reject it?", [("PRIVATE_KEY", v)]
    if k == 10:
        pw = rand(rng, 8, string.ascii_lowercase) + str(rng.randint(10, 99))
        return f"mysql://root:{pw}@db.internal:3306/plant", [("PASSWORD", pw)]
    if k == 11:
        return "git clone https://deploy:Pa55w0rd!@git.example.com/tools.git", [("PASSWORD", "Pa55w0rd!")]
    if k == 12:
        pw = rand(rng, 10)
        return f"password={pw}", [("PASSWORD", pw)]
    if k == 13:
        pw = rand(rng, 9) + "!"
        return f"login: admin\npassword: {pw}", [("PASSWORD", pw)]
    if k == 14:
        pw = rand(rng, 12)
        return f"export DB_PASSWORD='{pw}'", [("PASSWORD", pw)]
    if k == 15:
        v = rand(rng, 32, ALNUM + "-_")
        return f"curl -H \"Authorization: Bearer {v}\" https://api.example.com", [("ACCESS_TOKEN", v)]
    if k == 16:
        pw = rng.choice(["hunter22", "sunflower9", "BlueSky2024", "tr0ub4dor"])
        return f"the wifi password is {pw}", [("PASSWORD", pw)]
    if k == 17:
        pin = str(rng.randint(1000, 9999))
        return f"my pin is {pin}", [("PASSWORD", pin)]
    if k == 18:
        v = f"sk-{rand(rng, 48)}"
        return f"OPENAI_API_KEY={v}", [("API_KEY", v)]
    v = f"gho_{rand(rng, 36)}"
    return f"oauth token {v} expired", [("API_KEY", v)]


def pii_tuning(rng: random.Random, i: int) -> tuple:
    k = i % 15
    if k == 0:
        v = f"{rand(rng, 6, string.ascii_lowercase)}.{rand(rng, 5, string.ascii_lowercase)}@example.com"
        return f"mail me at {v}", [("EMAIL_ADDRESS", v)]
    if k == 1:
        v = nanp(rng, i)
        return f"call me on {v} after lunch", [("PHONE_NUMBER", v)]
    if k == 2:
        v = f"{rng.randint(201, 989)}{rng.randint(200, 989)}{rng.randint(1000, 9999)}"
        return f"reach me on my direct line {v}", [("PHONE_NUMBER", v)]
    if k == 3:
        v = f"{rng.randint(201, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
        return f"call{v} if the oven trips", [("PHONE_NUMBER", v)]
    if k == 4:
        v = ssn(rng)
        return f"SSN {v} on the form", [("US_SSN", v)]
    if k == 5:
        v = grouped(luhn_complete("4", 16, rng))
        return f"card {v} exp 04/29", [("CREDIT_CARD", v)]
    if k == 6:
        v = grouped(iban("DE", "".join(rng.choice(string.digits) for _ in range(18)))).lower()
        return f"pay to iban {v} please", [("IBAN_CODE", v)]
    if k == 7:
        v = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        return f"my laptop is {v} on the vpn", [("IP_ADDRESS", v)]
    if k == 8:
        v = f"{rng.randint(1, 999)} {rng.choice(['Baker', 'Oak', 'Maple', 'Elm'])} Street"
        return f"I live at {v}, London", [("STREET_ADDRESS", v)]
    if k == 9:
        v = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/19{rng.randint(50, 99)}"
        return f"born on {v} in Leeds", [("DATE_OF_BIRTH", v)]
    if k == 10:
        v = f"{rng.choice(['March', 'July', 'October'])} {rng.randint(1, 28)}, 19{rng.randint(50, 99)}"
        return f"DOB: {v}", [("DATE_OF_BIRTH", v)]
    if k == 11:
        v = rng.choice(string.ascii_uppercase) + str(rng.randint(1000000, 9999999))
        return f"passport number {v}", [("PASSPORT", v)]
    if k == 12:
        v = nino(rng)
        return f"my NI number is {v}", [("NATIONAL_ID", v)]
    if k == 13:
        v = dni(rng)
        return f"DNI {v} para el contrato", [("NATIONAL_ID", v)]
    v = f"Hauptstraße {rng.randint(1, 200)}"
    return f"Lieferung an {v}, 10115 Berlin", [("STREET_ADDRESS", v)]


# --- held-out templates (written separately, other formats) ---------------------------------------------------
def heldout_rows(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    add = lambda text, values, keep=(): rows.append(row(text, values, keep))  # noqa: E731
    name_templates = [
        "Could {n} review PX-{d} before Friday?",
        "The night shift was covered by {n}.",
        "{n} says the conveyor is jammed again",
        "hey it's {l}, the filter on line 4 is clogged",
        "please forward this to {l} in purchasing",
        "WE NEED {U} TO SIGN THE DEVIATION FORM",
        "Regards,\n{n}\nQuality Lead",
        "Meeting notes: {n} and {n2} agreed to retest batch {d}.",
        "According to {n}, the spindle needs new bearings.",
        "our supplier contact is {n} (purchasing)",
        "I am {n} and I need the calibration log",
        "who is {n}? she emailed about ORD-2026-{d4}",
        "Tell {n} the mold is ready.",
        "my colleague {l} found the leak",
        "thx, {f}",
    ]
    names = HELDOUT_NAMES
    for i, name in enumerate(names * 2):
        other = names[(i * 7 + 3) % len(names)]
        template = name_templates[i % len(name_templates)]
        text = template.format(n=name, n2=other, l=name.lower(), U=name.upper(), f=name.split()[0],
                               d=rng.randint(100, 999), d4=f"{rng.randint(1, 9999):04d}")
        values = [("PERSON", v) for v in (name, other, name.lower(), name.upper(), name.split()[0]) if v in text]
        values = [v for j, v in enumerate(values) if not any(v[1] in w[1] and v[1] != w[1] for w in values)]
        add(text, values[:2] if "{n2}" in template else values[:1])
    for name in HELDOUT_SCRIPT_NAMES:
        add(f"Contact person: {name}, plant 2", [("PERSON", name)])
        add(f"{name} confirmed the shipment of ORD-2025-{rng.randint(1000, 9999)}", [("PERSON", name)])
    for i in range(60):
        add(*secret_heldout(rng, i))
    for i in range(75):
        add(*pii_heldout(rng, i))
    return rows


def secret_heldout(rng: random.Random, i: int) -> tuple:
    k = i % 20
    if k == 0:
        v = f"sk-svcacct-{rand(rng, 64, ALNUM + '_-')}"
        return f"We rotated it, the new one is\n{v}\nright?", [("API_KEY", v)]
    if k == 1:
        v = f"github_pat_{rand(rng, 82, ALNUM + '_')}"
        return f"{{\"token\": \"{v}\"}}", [("API_KEY", v)]
    if k == 2:
        v = f"ghs_{rand(rng, 36)}"
        return f"Actions uses {v} for checkout", [("API_KEY", v)]
    if k == 3:
        v = (f"xoxp-{rng.randint(10**10, 10**11)}-{rng.randint(10**10, 10**11)}-{rng.randint(10**11, 10**12)}-"
             f"{rand(rng, 32, 'abcdef0123456789')}")
        return f"SLACK_USER_TOKEN: \"{v}\"", [("API_KEY", v)]
    if k == 4:
        v = f"hf_{rand(rng, 37)}"
        return f"from huggingface_hub import login; login(\"{v}\")", [("API_KEY", v)]
    if k == 5:
        v = f"rk_live_{rand(rng, 99)}"
        return f"restricted key {v} (read only)", [("API_KEY", v)]
    if k == 6:
        v = f"AIza{rand(rng, 35, ALNUM + '_-')}"
        return f"<script src=\"https://maps.googleapis.com/maps/api/js?key={v}\"></script>", [("API_KEY", v)]
    if k == 7:
        key, secret = "AKIA" + rand(rng, 16, string.ascii_uppercase + string.digits), rand(rng, 40, ALNUM + "/+")
        return f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\nregion = eu-west-1", \
            [("API_KEY", key), ("SECRET", secret)]
    if k == 8:
        v = jwt(rng)
        return f"Authorization: {v}", [("ACCESS_TOKEN", v)]
    if k == 9:
        v = private_key(rng, rng.choice(["", "EC ", "OPENSSH "]))
        return f"```\n{v}\n```", [("PRIVATE_KEY", v)]
    if k == 10:
        pw = rand(rng, 7, string.ascii_lowercase) + "#" + str(rng.randint(1, 9))
        return f"postgresql://app_user:{pw}@10.1.2.3:5432/mes", [("PASSWORD", pw), ("IP_ADDRESS", "10.1.2.3")]
    if k == 11:
        pw = rand(rng, 10) + "$"
        return f"ftp://scanner:{pw}@files.plant.local/in", [("PASSWORD", pw)]
    if k == 12:
        pw = rand(rng, 14)
        return f"DB_PASS = \"{pw}\"", [("PASSWORD", pw)]
    if k == 13:
        pw = rand(rng, 11)
        return f"spring.datasource.password: {pw}", [("PASSWORD", pw)]
    if k == 14:
        pw = rand(rng, 16)
        return f"set MQTT_PASSWORD={pw} && run.bat", [("PASSWORD", pw)]
    if k == 15:
        v = rand(rng, 40, ALNUM)
        return f"requests.get(url, headers={{'Authorization': 'Bearer {v}'}})", [("ACCESS_TOKEN", v)]
    if k == 16:
        pw = rng.choice(["Summer2025!", "letmein42", "p4ssw0rd", "Kaffee#Tasse7"])
        return f"The admin password for the HMI was changed to {pw} last week.", [("PASSWORD", pw)]
    if k == 17:
        pin = str(rng.randint(100000, 999999))
        return f"door code is {pin}, dont tell anyone", [("PASSWORD", pin)]
    if k == 18:
        pw = rng.choice(["correcthorse", "Tiger&Lily88", "mango-tango-9"])
        return f"you can use {pw} as the password for the test account", [("PASSWORD", pw)]
    pin = str(rng.randint(1000, 9999))
    return f"PIN: {pin}", [("PASSWORD", pin)]


def pii_heldout(rng: random.Random, i: int) -> tuple:
    k = i % 25
    if k == 0:
        v = f"{rand(rng, 5, string.ascii_lowercase)}_{rng.randint(1, 99)}@{rand(rng, 6, string.ascii_lowercase)}.co.uk"
        return f"send it to {v.upper()} thanks", [("EMAIL_ADDRESS", v.upper())]
    if k == 1:
        v = f"+44 20 {rng.randint(7000, 7999)} {rng.randint(1000, 9999)}"
        return f"my mobile: {v}", [("PHONE_NUMBER", v)]
    if k == 2:
        v = f"{rng.randint(201, 989)}{rng.randint(200, 989)}{rng.randint(1000, 9999)}"
        return f"text job {v} when done", [("PHONE_NUMBER", v)]
    if k == 3:
        v = f"({rng.randint(201, 989)}){rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
        return f"phone{v}", [("PHONE_NUMBER", v)]
    if k == 4:
        v = f"{rng.randint(100, 665)} {rng.randint(10, 99)} {rng.randint(1000, 9999)}"
        return f"social security number {v}", [("US_SSN", v)]
    if k == 5:
        v = luhn_complete(rng.choice(["51", "53", "55", "2221", "2720"]), 16, rng)
        return f"Mastercard {v}", [("CREDIT_CARD", v)]
    if k == 6:
        v = iban("GB", "NWBK" + "".join(rng.choice(string.digits) for _ in range(14)))
        return f"IBAN: {v.lower()}", [("IBAN_CODE", v.lower())]
    if k == 7:
        v = f"2001:db8:{rng.randint(1000, 9999)}::{rng.randint(10, 99)}"
        return f"ssh into {v}", [("IP_ADDRESS", v)]
    if k == 8:
        v = f"{rng.randint(10, 9999)} {rng.choice(['Willow', 'Cedar', 'Lakeview', 'Sunset'])} Ave"
        return f"ship the samples to {v}, Springfield, IL 62704", [("STREET_ADDRESS", v)]
    if k == 9:
        v = f"19{rng.randint(50, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        return f"date of birth {v}", [("DATE_OF_BIRTH", v)]
    if k == 10:
        v = f"{rng.randint(1, 28)} {rng.choice(['January', 'April', 'June'])} 19{rng.randint(60, 99)}"
        return f"I was born {v}.", [("DATE_OF_BIRTH", v)]
    if k == 11:
        v = f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}{rng.randint(1000000, 9999999)}"
        return f"Passport: {v}", [("PASSPORT", v)]
    if k == 12:
        v = cpf(rng)
        return f"meu CPF é {v}", [("NATIONAL_ID", v)]
    if k == 13:
        v = f"{rng.randint(2000, 9999)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"
        return f"aadhaar {v}", [("NATIONAL_ID", v)]
    if k == 14:
        v = f"{rng.randint(1, 99)} rue de la {rng.choice(['Paix', 'Gare', 'République'])}"
        return f"j'habite au {v}, 75002 Paris", [("STREET_ADDRESS", v)]
    if k == 15:
        v = f"{rng.randint(201, 989)} {rng.randint(200, 989)} {rng.randint(1000, 9999)}"
        return f"po {v} is my cell", [("PHONE_NUMBER", v)]
    if k == 16:
        v = f"{rand(rng, 4, string.ascii_lowercase)}@{rand(rng, 5, string.ascii_lowercase)}.io"
        return f"cc:{v}", [("EMAIL_ADDRESS", v)]
    if k == 17:
        v = f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.19{rng.randint(50, 99)}"
        return f"Geburtsdatum: {v}", [("DATE_OF_BIRTH", v)]
    if k == 18:
        v = f"{rng.randint(100000000, 999999999)}"
        return f"my driver's license number is D{v}", [("NATIONAL_ID", f"D{v}")]
    if k == 19:
        v = f"P.O. Box {rng.randint(100, 9999)}"
        return f"mail the invoice to {v}", [("STREET_ADDRESS", v)]
    if k == 20:
        v = luhn_complete(rng.choice(["34", "37"]), 15, rng)
        v = f"{v[:4]}-{v[4:10]}-{v[10:]}"
        return f"amex {v}", [("CREDIT_CARD", v)]
    if k == 21:
        v = f"{rng.randint(10, 250)} {rng.choice(['King', 'Queen', 'Church'])} Rd"
        return f"HOME ADDRESS: {v.upper()}", [("STREET_ADDRESS", v.upper())]
    if k == 22:
        v = f"+49 {rng.randint(150, 179)} {rng.randint(1000000, 9999999)}"
        return f"Handy {v}", [("PHONE_NUMBER", v)]
    if k == 23:
        v = f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(60, 99)}"
        return f"bday {v}", [("DATE_OF_BIRTH", v)]
    v = f"{rng.choice(['Calle Mayor', 'Avenida de la Paz', 'Calle Sol'])} {rng.randint(1, 99)}"
    return f"vivo en {v}, Madrid", [("STREET_ADDRESS", v)]


# --- domain identifiers ---------------------------------------------------------------------------------------
def domain_rows(rng: random.Random) -> list[dict]:
    rows = []
    templates = [
        ("Lot {lot} was produced on {date} and passed QC.", ["lot", "date"]),
        ("Part {part} needs {torque} on the M8 bolts.", ["part", "torque"]),
        ("Order {order} ships with firmware {version}.", ["order", "version"]),
        ("serial {serial} failed at {temp}; see ticket #{ticket}", ["serial", "temp", "ticket"]),
        ("produced on {date}, batch {batch}, line {line}", ["date", "batch", "line"]),
        ("Upgrade the controller from {version} to {version2} before {date}.", ["version", "version2", "date"]),
        ("Is {part} compatible with {part2}?", ["part", "part2"]),
        ("We scrapped {count} units from {lot} on {monthdate}.", ["lot", "monthdate"]),
        ("PO {po} covers {order} and {order2}.", ["po", "order", "order2"]),
        ("Job {job} on press 3 stopped at {time}; error E{code}.", ["job", "time"]),
        ("S/N {sn}: replaced the sensor, new pressure {pressure}.", ["sn", "pressure"]),
        ("Run {run} used recipe R-{recipe} at {rpm} rpm.", ["run"]),
        ("The Siemens S7-1500 on line {line} shows fault {fault}.", ["line"]),
        ("Check LOT {lot2} and LOT {lot} against spec {spec}.", ["lot2", "lot", "spec"]),
        ("Calibrated on {date} by the Berlin lab, certificate {cert}.", ["date", "cert"]),
        ("Install v{semver} of the MES client, build {build}.", ["semver"]),
        ("Zone {zone} humidity {humidity}, ambient {temp}.", ["temp"]),
        ("Drawing {drawing} rev {rev} supersedes {drawing2}.", ["drawing", "drawing2"]),
        ("ORDER {order} STATUS: SHIPPED ON {date}", ["order", "date"]),
        ("Batch {batch} expires {expiry}.", ["batch", "expiry"]),
    ]
    for i in range(400):
        text, keys = templates[i % len(templates)]
        values = domain_values(rng)
        filled = text.format(**values)
        keep = [values[k] if not k.startswith(("lot", "batch", "line", "job", "run", "po", "serial")) else
                f"{k_word(k, text)} {values[k]}" for k in keys]
        keep = [k for k in keep if k in filled]
        rows.append({"text": filled, "values": [], "keep": keep})
    return rows


def k_word(key: str, template: str) -> str:
    word = {"lot": "Lot", "lot2": "LOT", "batch": "batch", "line": "line", "job": "Job", "run": "Run", "po": "PO",
            "serial": "serial"}[key]
    if key == "lot" and "LOT {lot}" in template:
        return "LOT"
    if key == "batch" and "Batch {batch}" in template:
        return "Batch"
    return word


def domain_values(rng: random.Random) -> dict:
    letters = string.ascii_uppercase
    return {
        "lot": f"{rng.choice(letters)}-{rng.randint(1, 999)}",
        "lot2": f"{rng.choice(letters)}{rng.randint(10, 99)}-{rng.randint(1, 9)}",
        "date": f"20{rng.randint(20, 27)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "monthdate": f"{rng.choice(['March', 'Nov', 'July'])} {rng.randint(1, 28)}, 20{rng.randint(20, 27)}",
        "part": f"{rng.choice(['PX', 'HX', 'B', 'MTR', 'VLV'])}-{rng.randint(100, 99999)}",
        "part2": f"{rng.choice(['PX', 'KT'])}-{rng.randint(100, 9999)}{rng.choice(['', 'A', 'B'])}",
        "torque": f"{rng.randint(5, 250)} Nm",
        "order": f"ORD-20{rng.randint(20, 27)}-{rng.randint(1, 9999):04d}",
        "order2": f"ORD-{rng.randint(100000, 999999)}",
        "version": f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}",
        "version2": f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}",
        "semver": f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}",
        "serial": f"{rng.randint(10000, 999999999)}",
        "sn": f"SN-{rng.randint(1000, 99999)}-{rand(rng, 2, letters)}",
        "temp": f"{rng.randint(20, 400)}°C",
        "ticket": f"{rng.randint(1000, 99999)}",
        "batch": f"{rng.randint(100000, 999999)}",
        "line": f"{rng.randint(1, 12)}",
        "count": rng.randint(2, 500),
        "po": f"{rng.randint(10000, 999999)}",
        "job": f"{rng.randint(100, 99999)}",
        "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "code": rng.randint(10, 99),
        "pressure": f"{rng.randint(1, 9)}.{rng.randint(0, 9)} bar",
        "run": f"{rng.randint(1, 9999)}",
        "recipe": rng.randint(10, 99),
        "rpm": rng.randint(500, 9000),
        "fault": f"F{rng.randint(1000, 9999)}",
        "spec": f"DIN {rng.randint(900, 9999)}",
        "cert": f"CAL-{rng.randint(2020, 2027)}-{rng.randint(100, 999)}",
        "build": rng.randint(1000, 9999),
        "zone": rng.randint(1, 9),
        "humidity": f"{rng.randint(20, 80)}%",
        "drawing": f"DWG-{rng.randint(1000, 9999)}",
        "drawing2": f"DWG-{rng.randint(1000, 9999)}",
        "rev": rng.choice("ABCDE"),
        "expiry": f"{rng.randint(1, 12):02d}/20{rng.randint(26, 30)}",
    }


def row(text: str, values, keep=()) -> dict:
    values = [{"kind": kind, "value": value} for kind, value in values]
    for item in values:
        assert item["value"] in text, (item, text)
    for k in keep:
        assert k in text, (k, text)
    return {"text": text, "values": values, "keep": list(keep)}


# --- held-out "C": written after the rules were frozen; never tuned on --------------------------------------------
HELDOUT_C_NAMES = [
    "Obiageli Nnamdi", "Babajide Olatunji", "Chiamaka Okonkwo", "Kwame Mensah-Bonsu", "Nomvula Zungu",
    "Tshepo Molefe", "Wanjiku Kariuki", "Abebe Bekele", "Selam Tesfaye", "Moussa Diallo", "Aminata Traoré",
    "Hamza Benjelloun", "Yasmin Haddad", "Omar Farouk", "Noor Al-Hashimi", "Parisa Tehrani", "Dariusz Kowal",
    "Agnieszka Wiśniewska", "Vojtěch Novák", "Ilona Horváth", "Radu Ionescu", "Snežana Petrović", "Aleksi Virtanen",
    "Freyja Sigurdardottir", "Sindre Bakken", "Maëlle Lefebvre", "Théo Rousseau", "Beatriz Gonçalves",
    "Rodrigo Quispe", "Ximena Huerta", "Valentina Restrepo", "Kenta Yoshimura", "Misaki Ogawa", "Jae-sung Yoon",
    "Ji-hye Moon", "Thanh Pham", "Linh Dang", "Rahul Deshmukh", "Kavya Raghunathan", "Sunil Wijesinghe",
    "Ngaire Tipene", "Keoni Akana", "Lars-Erik Holm", "Ingrid Aasen", "Bogdan Shevchenko", "Oksana Bondarenko",
]
HELDOUT_C_SCRIPT_NAMES = ["강하늘", "윤서준", "林美玲", "周杰", "Сергей Волков", "Екатерина Морозова",
                          "Ελένη Δημητρίου", "中村 翔太", "Олександр Коваленко"]


def heldout_rows_c(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    add = lambda text, values, keep=(): rows.append(row(text, values, keep))  # noqa: E731
    templates = [
        ("{n} rebuilt the gearbox on cell 5.", "n"),
        ("Handover from {n}: the chiller alarm is cleared.", "n"),
        ("is {n} on shift tonight?", "n"),
        ("ok so {l} said to bump the feed rate", "l"),
        ("Shout-out to {n} for catching the crack in PX-{d}!", "n"),
        ("FROM: {U}\nSUBJECT: SCRAP REPORT", "U"),
        ("Best,\n{n}", "n"),
        ("I work with {n} on the paint line.", "n"),
        ("the technician ({n}) replaced the fuse", "n"),
        ("Escalate to {n} if ORD-2027-{d4} slips.", "n"),
        ("hello, {l} here from maintenance", "l"),
        ("Operator: {n} | Station: 7", "n"),
        ("{f} asked whether lot C-{d} can ship.", "f"),
        ("we hired {l} last month for quality", "l"),
        ("Can you draft an email to {n} about the delay?", "n"),
    ]
    for i, name in enumerate(HELDOUT_C_NAMES * 2):
        text, key = templates[i % len(templates)]
        value = {"n": name, "l": name.lower(), "U": name.upper(), "f": name.split()[0]}[key]
        add(text.format(n=name, l=name.lower(), U=name.upper(), f=name.split()[0], d=rng.randint(100, 999),
                        d4=f"{rng.randint(1, 9999):04d}"), [("PERSON", value)])
    for name in HELDOUT_C_SCRIPT_NAMES:
        add(f"Inspector {name} signed the audit for lot D-{rng.randint(10, 99)}.", [("PERSON", name)])
        add(f"please call {name} tomorrow", [("PERSON", name)])
    for i in range(40):
        add(*secret_heldout_c(rng, i))
    for i in range(60):
        add(*pii_heldout_c(rng, i))
    return rows


def secret_heldout_c(rng: random.Random, i: int) -> tuple:
    k = i % 20
    if k == 0:
        v = f"sk-ant-api03-{rand(rng, 93, ALNUM + '_-')}AA"
        return f"ANTHROPIC_API_KEY={v}", [("API_KEY", v)]
    if k == 1:
        v = f"glpat-{rand(rng, 20, ALNUM + '_-')}"
        return f"gitlab token is {v}", [("API_KEY", v)]
    if k == 2:
        key = "AKIA" + rand(rng, 16, string.ascii_uppercase + string.digits)
        secret = rand(rng, 40, ALNUM + "/+")
        return f'{{"AccessKeyId": "{key}", "SecretAccessKey": "{secret}"}}', [("API_KEY", key), ("SECRET", secret)]
    if k == 3:
        pw = rand(rng, 12)
        return f'{{"username": "svc", "password": "{pw}"}}', [("PASSWORD", pw)]
    if k == 4:
        pw = rand(rng, 10)
        return f"PGPASSWORD={pw} psql -h db -U app", [("PASSWORD", pw)]
    if k == 5:
        v = rand(rng, 50, ALNUM)
        return f"SECRET_KEY={v}", [("SECRET", v)]
    if k == 6:
        v = rand(rng, 32, ALNUM)
        return f"GET /api/v1/items?access_token={v}&page=2", [("ACCESS_TOKEN", v)]
    if k == 7:
        pw = rng.choice(["bananas!", "Winter#22", "qwerty123"])
        return f"my password's {pw} but it stopped working", [("PASSWORD", pw)]
    if k == 8:
        pw = rng.choice(["plant2024", "Zx9!kq", "Hello123"])
        return f"pw is {pw}", [("PASSWORD", pw)]
    if k == 9:
        v = private_key(rng, "")
        return f"key file contents: {v}", [("PRIVATE_KEY", v)]
    if k == 10:
        v = f"xoxb-{rng.randint(10**11, 10**12)}-{rng.randint(10**12, 10**13)}-{rand(rng, 24)}"
        return f"SLACK_BOT_TOKEN = '{v}'", [("API_KEY", v)]
    if k == 11:
        v = jwt(rng)
        return f"cookie: session={v}", [("ACCESS_TOKEN", v)]
    if k == 12:
        pw = rand(rng, 8)
        return f"smtp://alerts:{pw}@mail.plant.local:587", [("PASSWORD", pw)]
    if k == 13:
        v = rand(rng, 36, ALNUM)
        return f"authorization: bearer {v}", [("ACCESS_TOKEN", v)]
    if k == 14:
        pin = str(rng.randint(1000, 9999))
        return f"the alarm code is {pin}", [("PASSWORD", pin)]
    if k == 15:
        pw = rng.choice(["tulip-river-42", "Sommer2025", "ch33seburger"])
        return f"I set the router password to {pw} yesterday", [("PASSWORD", pw)]
    if k == 16:
        v = f"hf_{rand(rng, 34)}"
        return f"token: {v}", [("API_KEY", v)]
    if k == 17:
        v = f"github_pat_{rand(rng, 22)}_{rand(rng, 59)}"
        return f"git remote set-url origin https://{v}@github.com/acme/mes.git", [("API_KEY", v)]
    if k == 18:
        v = f"sk_test_{rand(rng, 24)}"
        return f"STRIPE_SECRET_KEY: {v}", [("API_KEY", v)]
    pw = rand(rng, 9)
    return f"mysql -u root -p{pw} factory", [("PASSWORD", pw)]


def pii_heldout_c(rng: random.Random, i: int) -> tuple:
    k = i % 20
    if k == 0:
        v = (f"{rand(rng, 5, string.ascii_lowercase)}.{rand(rng, 7, string.ascii_lowercase)}"
             f"@plant-{rng.randint(1, 9)}.example.net")
        return f"Reply-To: <{v}>", [("EMAIL_ADDRESS", v)]
    if k == 1:
        v = f"+91 {rng.randint(70000, 99999)} {rng.randint(10000, 99999)}"
        return f"whatsapp {v}", [("PHONE_NUMBER", v)]
    if k == 2:
        v = f"{rng.randint(201, 989)}-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
        return f"ph:{v}", [("PHONE_NUMBER", v)]
    if k == 3:
        v = f"{rng.randint(201, 989)}{rng.randint(200, 989)}{rng.randint(1000, 9999)}"
        return f"my work line is {v} ext 4", [("PHONE_NUMBER", v)]
    if k == 4:
        v = ssn(rng)
        return f"SSN: {v}", [("US_SSN", v)]
    if k == 5:
        v = "-".join(grouped(luhn_complete("4", 16, rng)).split())
        return f"visa {v}", [("CREDIT_CARD", v)]
    if k == 6:
        v = iban("NL", "ABNA" + "".join(rng.choice(string.digits) for _ in range(10))).lower()
        return f"rekening {v}", [("IBAN_CODE", v)]
    if k == 7:
        v = f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        return f"ping {v} from the HMI", [("IP_ADDRESS", v)]
    if k == 8:
        v = f"{rng.randint(100, 9999)} {rng.choice(['Pennsylvania', 'Lincoln', 'Harbor'])} Avenue NW"
        return f"our office: {v}, Washington, DC 20500", [("STREET_ADDRESS", v)]
    if k == 9:
        v = f"Flat {rng.randint(1, 9)}, {rng.randint(2, 99)} Acacia Avenue"
        return f"deliver to {v}", [("STREET_ADDRESS", v)]
    if k == 10:
        v = f"19{rng.randint(50, 99)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
        return f"d.o.b {v}", [("DATE_OF_BIRTH", v)]
    if k == 11:
        v = f"{rng.randint(1, 28)}th {rng.choice(['May', 'August', 'December'])} 19{rng.randint(60, 99)}"
        return f"my birthday is on {v}", [("DATE_OF_BIRTH", v)]
    if k == 12:
        v = str(rng.randint(100000000, 999999999))
        return f"passport no. {v}", [("PASSPORT", v)]
    if k == 13:
        v = f"{rng.randint(100, 999)} {rng.randint(100, 999)} {rng.randint(100, 999)}"
        return f"SIN {v}", [("NATIONAL_ID", v)]
    if k == 14:
        v = f"{rng.randint(100, 999)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        return f"NHS number {v}", [("NATIONAL_ID", v)]
    if k == 15:
        v = f"{rng.randint(10, 99)}{rng.randint(10, 12)}{rng.randint(10, 28)}{rng.randint(10000, 99999)}"
        return f"PESEL {v}", [("NATIONAL_ID", v)]
    if k == 16:
        v = f"{rng.randint(201, 989)}.{rng.randint(200, 989)}.{rng.randint(1000, 9999)}"
        return f"mobile#{v}", [("PHONE_NUMBER", v)]
    if k == 17:
        v = f"{rng.choice(['Kungsgatan', 'Storgatan'])} {rng.randint(1, 99)}"
        return f"adress: {v}, Stockholm", [("STREET_ADDRESS", v)]
    if k == 18:
        v = f"+81 3-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
        return f"Tokyo office {v}", [("PHONE_NUMBER", v)]
    v = f"{rng.randint(10, 28)}/{rng.randint(1, 12):02d}/{rng.randint(1960, 1999)}"
    return f"DOB {v}", [("DATE_OF_BIRTH", v)]


def domain_rows_c(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(200):
        v = domain_values(rng)
        sap_po = f"45{rng.randint(10000000, 99999999)}"
        texts = [
            (f"Ask Maintenance to check {v['part']} before the audit.", [v["part"]]),
            (f"The Bosch Rexroth valve on line {v['line']} leaks at {v['pressure']}.",
             [f"line {v['line']}", v["pressure"]]),
            (f"Use Loctite 243 on the M6 screws of {v['part2']}.", [v["part2"]]),
            (f"PO {sap_po} (SAP) covers {v['order']}.", [f"PO {sap_po}", v["order"]]),
            (f"LOT {v['lot']} QTY 500 SHIPPED {v['date']}", [f"LOT {v['lot']}", v["date"]]),
            (f"our line celebrates its birthday on {v['date']}... kidding, that's the produced-on date", [v["date"]]),
            (f"run {v['run']} took 00:42:17 on the Raspberry Pi 4", [f"run {v['run']}"]),
            (f"Send the Berlin plant the {v['version']} release notes.", [v["version"]]),
            (f"serial number {v['serial']}, manufactured {v['monthdate']}", [v["serial"], v["monthdate"]]),
            (f"Torque spec for {v['part']}: {v['torque']} ± 2 Nm", [v["part"], v["torque"]]),
            (f"pallet 12 of order {v['order2']} was produced on {v['date']}", [v["order2"], v["date"]]),
            (f"Grafana dashboard v{v['semver']} shows OEE 81.5% for week 14", [v["semver"]]),
        ]
        text, keep = texts[i % len(texts)]
        rows.append({"text": text, "values": [], "keep": keep})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    write(HERE / "privacy_tuning.jsonl", tuning_rows(random.Random(13)))
    write(HERE / "privacy_dev.jsonl", heldout_rows(random.Random(2026)))
    write(HERE / "privacy_heldout.jsonl", heldout_rows_c(random.Random(31)))
    write(HERE / "domain_ids.jsonl", domain_rows(random.Random(7)) + domain_rows_c(random.Random(8)))


if __name__ == "__main__":
    main()
