"""Built-in probe sets, generated from templates so that `builtin:*` needs no data files.

Each generator draws from `random.Random(0)` in a fixed order and skips repeated prompts,
so the output is deterministic and `f(n)[:k] == f(k)` for k <= n. The math and code sets
imitate GSM8K and MBPP (the skills one usually wants to forget); the general set is the
"everything else" contrast that must keep working.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable

from unskill.runtime.errors import UnskillError
from unskill.stats.items import Item

__all__ = ["math_items", "code_items", "general_items"]

_MAX_TRIES_PER_ITEM = 200


def _distinct(kind: str, n: int, draw: Callable[[random.Random], tuple[str, str]]) -> list[Item]:
    """Draw (prompt, completion) pairs until n distinct prompts exist; fail loudly if the templates run dry."""
    if n < 1:
        raise UnskillError(f"builtin:{kind}: n must be >= 1 (got {n})")
    rng = random.Random(0)
    seen: set[str] = set()
    items = []
    for _ in range(n * _MAX_TRIES_PER_ITEM):
        prompt, completion = draw(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append(Item(prompt, completion))
        if len(items) == n:
            return items
    raise UnskillError(f"builtin:{kind}: cannot make {n} distinct prompts (the templates ran out at {len(items)})")


# --------------------------------------------------------------------------- math

@dataclass(frozen=True)
class _Person:
    name: str
    he: str

    @property
    def He(self) -> str:
        return self.he.capitalize()

    @property
    def him(self) -> str:
        return "him" if self.he == "he" else "her"

    @property
    def his(self) -> str:
        return "his" if self.he == "he" else "her"

    @property
    def His(self) -> str:
        return self.his.capitalize()


_PEOPLE = [_Person(n, "she") for n in (
    "Maria", "Aisha", "Sofia", "Mei", "Priya", "Hannah", "Fatima", "Zoe", "Amara", "Ingrid", "Chloe", "Elena",
)] + [_Person(n, "he") for n in (
    "James", "Liam", "Noah", "Diego", "Omar", "Kenji", "Lucas", "Mateo", "Ethan", "Raj", "Tariq", "Samuel",
)]

_Math = tuple[str, list[str], int]


def _change(r: random.Random, p: _Person) -> _Math:
    item = r.choice(["notebooks", "pens", "mugs", "candles", "comic books", "plant pots"])
    q, price = r.randint(2, 9), r.randint(2, 12)
    cost = q * price
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    return (f"{p.name} buys {q} {item} that cost ${price} each. {p.He} pays with a ${bill} bill. "
            f"How much change does {p.he} get back?",
            [f"The {item} cost {q} * {price} = ${cost}.",
             f"{p.He} gets {bill} - {cost} = ${bill - cost} in change."], bill - cost)


def _bake_sale(r: random.Random, p: _Person) -> _Math:
    treat = r.choice(["cookies", "muffins", "brownies", "cupcakes"])
    batches, per, price = r.randint(2, 6), r.choice([12, 16, 18, 24]), r.randint(2, 4)
    spent = r.randint(5, 30)
    total, revenue = batches * per, batches * per * price
    return (f"{p.name} bakes {batches} batches of {treat} with {per} {treat} in each batch. "
            f"{p.He} sells all of them at a bake sale for ${price} each. The ingredients cost {p.him} ${spent}. "
            f"How much profit does {p.he} make?",
            [f"{p.He} bakes {batches} * {per} = {total} {treat}.",
             f"{p.He} earns {total} * {price} = ${revenue}.",
             f"Profit is {revenue} - {spent} = ${revenue - spent}."], revenue - spent)


def _drive(r: random.Random, p: _Person) -> _Math:
    s1, h1, s2, h2 = r.choice([40, 50, 60, 65]), r.randint(2, 5), r.choice([30, 45, 55, 70]), r.randint(2, 4)
    d1, d2 = s1 * h1, s2 * h2
    return (f"{p.name} drives at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for {h2} more hours. "
            f"How many miles does {p.he} drive in total?",
            [f"First {p.he} drives {s1} * {h1} = {d1} miles.",
             f"Then {p.he} drives {s2} * {h2} = {d2} miles.",
             f"In total {p.he} drives {d1} + {d2} = {d1 + d2} miles."], d1 + d2)


def _wages(r: random.Random, p: _Person) -> _Math:
    job = r.choice(["a cafe", "a bookstore", "the library", "a bike shop", "a farm"])
    wage, hours, days = r.randint(9, 25), r.randint(3, 8), r.randint(2, 6)
    daily = wage * hours
    return (f"{p.name} works at {job} and earns ${wage} per hour. {p.He} works {hours} hours a day, "
            f"{days} days a week. How much does {p.he} earn in a week?",
            [f"Each day {p.he} earns {wage} * {hours} = ${daily}.",
             f"Each week {p.he} earns {daily} * {days} = ${daily * days}."], daily * days)


def _reading(r: random.Random, p: _Person) -> _Math:
    per_day, days, done = r.choice([10, 12, 15, 20, 25, 30]), r.randint(4, 15), r.randint(10, 90)
    total = done + per_day * days
    left = total - done
    return (f"{p.name}'s book has {total} pages. {p.He} has already read {done} pages. If {p.he} reads "
            f"{per_day} pages a day, how many more days will it take {p.him} to finish the book?",
            [f"{p.He} has {total} - {done} = {left} pages left.",
             f"It takes {left} / {per_day} = {days} days."], days)


def _give_fraction(r: random.Random, p: _Person) -> _Math:
    thing = r.choice(["marbles", "stickers", "trading cards", "seashells", "stamps"])
    k = r.choice([2, 3, 4, 5])
    n = k * r.randint(6, 20)
    given = n // k
    kept = n - given
    extra = r.randint(1, kept - 1)
    friend = r.choice(["friend", "cousin", "neighbor", "classmate"])
    return (f"{p.name} has {n} {thing}. {p.He} gives 1/{k} of them to {p.his} {friend} and then gives {extra} "
            f"to {p.his} brother. How many {thing} does {p.name} have left?",
            [f"{p.He} gives away {n} / {k} = {given} {thing} to {p.his} {friend}.",
             f"{p.He} then has {n} - {given} = {kept} {thing}.",
             f"After giving {extra} to {p.his} brother, {p.he} has {kept} - {extra} = {kept - extra} {thing}."],
            kept - extra)


def _discount(r: random.Random, p: _Person) -> _Math:
    item = r.choice(["shirts", "pairs of shoes", "jackets", "backpacks", "lamps"])
    price, pct, q = 20 * r.randint(1, 8), r.choice([10, 20, 25, 50]), r.randint(2, 5)
    off = price * pct // 100
    new = price - off
    return (f"A store sells {item} for ${price} each. This week they are {pct}% off. "
            f"{p.name} buys {q} of them. How much does {p.he} pay?",
            [f"The discount is {price} * {pct} / 100 = ${off}.",
             f"Each one costs {price} - {off} = ${new}.",
             f"{p.He} pays {new} * {q} = ${new * q}."], new * q)


def _share(r: random.Random, p: _Person) -> _Math:
    thing = r.choice(["candies", "grapes", "crayons", "pretzels", "strawberries"])
    friends, each, kept = r.randint(2, 8), r.randint(2, 9), r.randint(1, 10)
    total = friends * each + kept
    rest = total - kept
    return (f"{p.name} has {total} {thing}. {p.He} keeps {kept} for {p.him}self and shares the rest "
            f"equally among {friends} friends. How many {thing} does each friend get?",
            [f"{p.He} shares {total} - {kept} = {rest} {thing}.",
             f"Each friend gets {rest} / {friends} = {each} {thing}."], each)


def _ages_sum(r: random.Random, p: _Person) -> _Math:
    other = r.choice([q for q in _PEOPLE if q.name != p.name])
    young, gap, later = r.randint(4, 30), r.randint(2, 12), r.randint(2, 10)
    old = young + gap
    return (f"{p.name} is {gap} years older than {other.name}. {other.name} is {young} years old. "
            f"What will the sum of their ages be in {later} years?",
            [f"{p.name} is {young} + {gap} = {old} years old.",
             f"In {later} years {p.name} will be {old} + {later} = {old + later}.",
             f"In {later} years {other.name} will be {young} + {later} = {young + later}.",
             f"The sum will be {old + later} + {young + later} = {old + young + 2 * later}."],
            old + young + 2 * later)


def _ages_times(r: random.Random, p: _Person) -> _Math:
    k = r.choice([3, 4, 5])
    child = r.choice([c for c in range(5, 17) if 20 <= c * (k - 1) <= 45])
    parent = child * k
    rel = "mother" if p.he == "she" else "father"
    return (f"{p.name}'s {rel} is {k} times as old as {p.name}. {p.name} is {child} years old. "
            f"How old was {p.his} {rel} when {p.name} was born?",
            [f"{p.His} {rel} is {child} * {k} = {parent} years old.",
             f"When {p.name} was born, {p.his} {rel} was {parent} - {child} = {parent - child}."], parent - child)


def _saving(r: random.Random, p: _Person) -> _Math:
    goal = r.choice(["a bicycle", "a guitar", "a video game console", "a tablet", "a camera"])
    weekly, weeks, has = r.choice([5, 8, 10, 12, 15, 20]), r.randint(3, 20), r.randint(10, 80)
    price = has + weekly * weeks
    need = price - has
    return (f"{p.name} wants to buy {goal} that costs ${price}. {p.He} already has ${has} and saves ${weekly} "
            f"every week. How many weeks will it take {p.him} to have enough money?",
            [f"{p.He} still needs {price} - {has} = ${need}.",
             f"It will take {need} / {weekly} = {weeks} weeks."], weeks)


def _garden(r: random.Random, p: _Person) -> _Math:
    crop = r.choice(["tomatoes", "peppers", "cucumbers", "zucchinis"])
    rows, plants, each = r.randint(2, 8), 2 * r.randint(2, 6), r.randint(3, 10)
    total = rows * plants * each
    box = r.choice([b for b in range(2, 11) if total % b == 0])
    return (f"{p.name} plants {rows} rows of {crop} with {plants} plants in each row. Each plant grows {each} "
            f"{crop}. {p.He} packs them into boxes of {box}. How many boxes does {p.he} fill?",
            [f"There are {rows} * {plants} = {rows * plants} plants.",
             f"They grow {rows * plants} * {each} = {total} {crop}.",
             f"{p.He} fills {total} / {box} = {total // box} boxes."], total // box)


def _raise(r: random.Random, p: _Person) -> _Math:
    salary, pct = 100 * r.randint(15, 60), r.choice([5, 10, 15, 20])
    inc = salary * pct // 100
    new = salary + inc
    return (f"{p.name} earns ${salary} per month. {p.He} gets a {pct}% raise. "
            f"How much will {p.he} earn in a year after the raise?",
            [f"The raise is {salary} * {pct} / 100 = ${inc} per month.",
             f"{p.His} new salary is {salary} + {inc} = ${new} per month.",
             f"In a year {p.he} earns {new} * 12 = ${new * 12}."], new * 12)


def _eggs(r: random.Random, p: _Person) -> _Math:
    dozens, per_cake = r.randint(2, 6), r.randint(2, 4)
    total = dozens * 12
    cakes = r.randint(1, total // per_cake - 1)
    used = cakes * per_cake
    return (f"{p.name} buys {dozens} dozen eggs. {p.He} bakes {cakes} cakes, and each cake needs {per_cake} eggs. "
            f"How many eggs are left?",
            [f"{p.He} buys {dozens} * 12 = {total} eggs.",
             f"The cakes use {cakes} * {per_cake} = {used} eggs.",
             f"There are {total} - {used} = {total - used} eggs left."], total - used)


def _fence(r: random.Random, p: _Person) -> _Math:
    length, width, price = r.randint(8, 40), r.randint(5, 30), r.randint(2, 9)
    perim = 2 * (length + width)
    return (f"{p.name} wants to fence a rectangular garden that is {length} feet long and {width} feet wide. "
            f"Fencing costs ${price} per foot. How much will the fence cost?",
            [f"The perimeter is 2 * ({length} + {width}) = {perim} feet.",
             f"The fence costs {perim} * {price} = ${perim * price}."], perim * price)


def _supplies(r: random.Random, p: _Person) -> _Math:
    a, x, b, y, bag = r.randint(2, 10), r.randint(1, 3), r.randint(2, 6), r.randint(2, 5), r.randint(15, 40)
    return (f"For school, {p.name} buys {a} pencils for ${x} each, {b} notebooks for ${y} each and a backpack "
            f"for ${bag}. How much does {p.he} spend in total?",
            [f"The pencils cost {a} * {x} = ${a * x}.",
             f"The notebooks cost {b} * {y} = ${b * y}.",
             f"In total {p.he} spends {a * x} + {b * y} + {bag} = ${a * x + b * y + bag}."], a * x + b * y + bag)


def _pool(r: random.Random, p: _Person) -> _Math:
    rate, minutes, start = r.choice([5, 8, 10, 12, 20, 25]), r.randint(10, 90), 10 * r.randint(5, 40)
    size = start + rate * minutes
    left = size - start
    return (f"{p.name}'s pool holds {size} gallons of water. It already has {start} gallons in it. A hose adds "
            f"{rate} gallons per minute. How many minutes will it take to fill the pool?",
            [f"The pool needs {size} - {start} = {left} more gallons.",
             f"It takes {left} / {rate} = {minutes} minutes."], minutes)


def _practice(r: random.Random, p: _Person) -> _Math:
    hobby = r.choice(["piano", "violin", "chess", "basketball", "drawing", "swimming"])
    weekday, weekend = r.choice([15, 20, 25, 30, 40, 45]), r.choice([30, 45, 60, 90])
    a, b = 5 * weekday, 2 * weekend
    return (f"{p.name} practices {hobby} for {weekday} minutes every weekday and {weekend} minutes on each day "
            f"of the weekend. How many minutes does {p.he} practice in a week?",
            [f"On weekdays {p.he} practices 5 * {weekday} = {a} minutes.",
             f"On the weekend {p.he} practices 2 * {weekend} = {b} minutes.",
             f"In a week {p.he} practices {a} + {b} = {a + b} minutes."], a + b)


def _class_fraction(r: random.Random, p: _Person) -> _Math:
    num, den = r.choice([(1, 3), (2, 3), (1, 4), (3, 4), (2, 5), (3, 5)])
    n = den * 2 * r.randint(2, 6)
    soccer = n * num // den
    rest = n - soccer
    return (f"In {p.name}'s class there are {n} students. {num}/{den} of them like soccer best and the rest like "
            f"basketball best. Half of the basketball fans are girls. How many basketball fans are girls?",
            [f"{n} * {num} / {den} = {soccer} students like soccer.",
             f"{n} - {soccer} = {rest} students like basketball.",
             f"{rest} / 2 = {rest // 2} of them are girls."], rest // 2)


def _train(r: random.Random, p: _Person) -> _Math:
    speed, hours, wait = r.choice([40, 50, 60, 75, 80]), r.randint(2, 8), r.randint(2, 3)
    dist = speed * hours
    return (f"{p.name} takes a train that travels {dist} miles at {speed} miles per hour. On the way the train "
            f"waits {wait} hours at a station. How many hours does the whole trip take?",
            [f"The train moves for {dist} / {speed} = {hours} hours.",
             f"The whole trip takes {hours} + {wait} = {hours + wait} hours."], hours + wait)


def _market(r: random.Random, p: _Person) -> _Math:
    fruit = r.choice(["apples", "pears", "peaches", "plums", "oranges"])
    bag, bags, bad, price = r.choice([4, 5, 6, 8, 10]), r.randint(5, 20), r.randint(2, 15), r.randint(2, 6)
    good = bag * bags
    picked = good + bad
    return (f"{p.name} picks {picked} {fruit}. {bad} of them are bruised and thrown away. {p.He} sells the rest "
            f"in bags of {bag} for ${price} a bag. How much money does {p.he} make?",
            [f"{p.He} has {picked} - {bad} = {good} good {fruit}.",
             f"That makes {good} / {bag} = {bags} bags.",
             f"{p.He} makes {bags} * {price} = ${bags * price}."], bags * price)


_MATH_TEMPLATES: list[Callable[[random.Random, _Person], _Math]] = [
    _change, _bake_sale, _drive, _wages, _reading, _give_fraction, _discount, _share, _ages_sum, _ages_times,
    _saving, _garden, _raise, _eggs, _fence, _supplies, _pool, _practice, _class_fraction, _train, _market,
]


def math_items(n: int = 300) -> list[Item]:
    """GSM8K-style word problems; every worked step is a checkable `expr = value` and ends in `#### <answer>`."""
    def draw(r: random.Random) -> tuple[str, str]:
        template = r.choice(_MATH_TEMPLATES)
        question, steps, answer = template(r, r.choice(_PEOPLE))
        return question, "\n".join(steps) + f"\n#### {answer}"
    return _distinct("math", n, draw)


# --------------------------------------------------------------------------- code

@dataclass(frozen=True)
class _CodeTask:
    """One MBPP-like task: `body` uses {0}, {1}, ... for the parameters; `ref` computes the asserted outputs."""
    text: str
    names: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]
    body: str
    ref: Callable
    args: Callable[[random.Random], tuple]


def _ints(r: random.Random, lo: int = 2, hi: int = 7, top: int = 50) -> list[int]:
    return [r.randint(0, top) for _ in range(r.randint(lo, hi))]


_WORDS = ["python", "level", "banana", "radar", "program", "noon", "listen", "silent", "apple", "kayak",
          "rotor", "planet", "stats", "orange", "madam", "window", "refer", "garden", "civic", "puzzle"]
_PHRASES = ["hello world", "the quick brown fox", "python is fun", "keep it simple", "data beats opinions",
            "read the docs", "one two three four", "good morning everyone", "write tests first", "less is more"]
_ANAGRAMS = [("listen", "silent"), ("evil", "vile"), ("night", "thing"), ("angel", "glean"), ("apple", "paper"),
             ("below", "elbow"), ("state", "taste"), ("hello", "world"), ("dusty", "study"), ("cat", "dog")]


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out


_CODE_TASKS = [
    _CodeTask("find the sum of all elements in a list", ("sum_list", "list_sum", "total_sum"),
              (("nums",), ("arr",), ("lst",)), "    return sum({0})", sum, lambda r: (_ints(r),)),
    _CodeTask("find the largest element in a list", ("find_max", "max_of_list", "largest_element"),
              (("nums",), ("arr",), ("lst",)), "    return max({0})", max, lambda r: (_ints(r),)),
    _CodeTask("reverse a given string", ("reverse_string", "rev_str", "reverse_text"),
              (("s",), ("text",), ("word",)), "    return {0}[::-1]", lambda s: s[::-1],
              lambda r: (r.choice(_WORDS + _PHRASES),)),
    _CodeTask("count the number of vowels in a string", ("count_vowels", "vowel_count", "num_vowels"),
              (("s",), ("text",), ("string",)), "    return sum(1 for ch in {0}.lower() if ch in 'aeiou')",
              lambda s: sum(1 for ch in s.lower() if ch in "aeiou"), lambda r: (r.choice(_WORDS + _PHRASES),)),
    _CodeTask("check whether a given string is a palindrome", ("is_palindrome", "check_palindrome", "palindrome"),
              (("s",), ("text",), ("word",)), "    return {0} == {0}[::-1]", lambda s: s == s[::-1],
              lambda r: (r.choice(_WORDS),)),
    _CodeTask("find the factorial of a number", ("factorial", "fact", "compute_factorial"),
              (("n",), ("num",), ("k",)),
              "    result = 1\n    for i in range(2, {0} + 1):\n        result *= i\n    return result",
              _factorial, lambda r: (r.randint(0, 12),)),
    _CodeTask("find the n-th fibonacci number", ("fibonacci", "fib", "nth_fibonacci"),
              (("n",), ("num",), ("k",)),
              "    a, b = 0, 1\n    for _ in range({0}):\n        a, b = b, a + b\n    return a",
              _fib, lambda r: (r.randint(1, 25),)),
    _CodeTask("check whether a number is prime", ("is_prime", "check_prime", "prime_num"),
              (("n",), ("num",), ("x",)),
              "    if {0} < 2:\n        return False\n    for d in range(2, int({0} ** 0.5) + 1):\n"
              "        if {0} % d == 0:\n            return False\n    return True",
              _is_prime, lambda r: (r.randint(0, 120),)),
    _CodeTask("find the greatest common divisor of two numbers", ("gcd", "find_gcd", "greatest_common_divisor"),
              (("a", "b"), ("x", "y"), ("m", "n")),
              "    while {1}:\n        {0}, {1} = {1}, {0} % {1}\n    return {0}",
              _gcd, lambda r: (r.randint(1, 100), r.randint(1, 100))),
    _CodeTask("count the occurrences of an element in a list", ("count_occurrences", "count_item", "frequency"),
              (("lst", "x"), ("items", "target"), ("nums", "value")), "    return {0}.count({1})",
              lambda xs, x: xs.count(x), lambda r: (_ints(r, 4, 9, 5), r.randint(0, 5))),
    _CodeTask("remove duplicates from a list while keeping the original order",
              ("remove_duplicates", "unique_in_order", "dedupe"), (("nums",), ("lst",), ("items",)),
              "    seen = []\n    for item in {0}:\n        if item not in seen:\n            seen.append(item)\n"
              "    return seen", lambda xs: list(dict.fromkeys(xs)), lambda r: (_ints(r, 4, 9, 6),)),
    _CodeTask("multiply each element of a list by a given number", ("multiply_list", "scale_list", "times_k"),
              (("nums", "k"), ("lst", "factor"), ("arr", "n")), "    return [x * {1} for x in {0}]",
              lambda xs, k: [x * k for x in xs], lambda r: (_ints(r, 2, 6, 20), r.randint(2, 9))),
    _CodeTask("return the even numbers from a list", ("even_numbers", "filter_even", "get_evens"),
              (("nums",), ("lst",), ("arr",)), "    return [x for x in {0} if x % 2 == 0]",
              lambda xs: [x for x in xs if x % 2 == 0], lambda r: (_ints(r, 3, 8),)),
    _CodeTask("capitalize the first letter of each word in a string", ("capitalize_words", "title_words", "cap_words"),
              (("s",), ("text",), ("sentence",)), "    return ' '.join(w.capitalize() for w in {0}.split())",
              lambda s: " ".join(w.capitalize() for w in s.split()), lambda r: (r.choice(_PHRASES),)),
    _CodeTask("find the sum of the digits of a non-negative integer", ("sum_digits", "digit_sum", "add_digits"),
              (("n",), ("num",), ("x",)), "    return sum(int(d) for d in str({0}))",
              lambda n: sum(int(d) for d in str(n)), lambda r: (r.randint(0, 99999),)),
    _CodeTask("find the second largest distinct number in a list", ("second_largest", "second_max", "runner_up"),
              (("nums",), ("lst",), ("arr",)), "    return sorted(set({0}))[-2]",
              lambda xs: sorted(set(xs))[-2], lambda r: ([1, 2] + _ints(r, 2, 6),)),
    _CodeTask("merge two dictionaries into one", ("merge_dicts", "combine_dicts", "merge_dictionaries"),
              (("d1", "d2"), ("a", "b"), ("first", "second")), "    return {{**{0}, **{1}}}",
              lambda a, b: {**a, **b},
              lambda r: tuple({k: r.randint(0, 9) for k in r.sample("abcdef", r.randint(1, 3))} for _ in range(2))),
    _CodeTask("find the average of a list of numbers", ("average", "mean", "list_average"),
              (("nums",), ("lst",), ("values",)), "    return sum({0}) / len({0})",
              lambda xs: sum(xs) / len(xs), lambda r: (_ints(r, 2, 6, 20),)),
    _CodeTask("check whether two strings are anagrams of each other", ("are_anagrams", "is_anagram", "check_anagram"),
              (("s1", "s2"), ("a", "b"), ("first", "second")), "    return sorted({0}) == sorted({1})",
              lambda a, b: sorted(a) == sorted(b), lambda r: r.choice(_ANAGRAMS)),
    _CodeTask("count the number of words in a string", ("count_words", "word_count", "num_words"),
              (("s",), ("text",), ("sentence",)), "    return len({0}.split())",
              lambda s: len(s.split()), lambda r: (r.choice(_PHRASES),)),
    _CodeTask("square each element of a list", ("square_list", "squares", "square_elements"),
              (("nums",), ("lst",), ("arr",)), "    return [x ** 2 for x in {0}]",
              lambda xs: [x ** 2 for x in xs], lambda r: (_ints(r, 2, 6, 15),)),
    _CodeTask("find the smallest of three numbers", ("min_of_three", "smallest", "find_min"),
              (("a", "b", "c"), ("x", "y", "z"), ("p", "q", "r")), "    return min({0}, {1}, {2})",
              min, lambda r: tuple(r.randint(-50, 50) for _ in range(3))),
    _CodeTask("convert a temperature from celsius to fahrenheit", ("celsius_to_fahrenheit", "c_to_f", "to_fahrenheit"),
              (("c",), ("celsius",), ("temp",)), "    return {0} * 9 / 5 + 32",
              lambda c: c * 9 / 5 + 32, lambda r: (5 * r.randint(-8, 20),)),
    _CodeTask("check whether a number is even", ("is_even", "check_even", "even"),
              (("n",), ("num",), ("x",)), "    return {0} % 2 == 0", lambda n: n % 2 == 0,
              lambda r: (r.randint(0, 999),)),
    _CodeTask("find the sum of squares of the first n natural numbers", ("square_sum", "sum_of_squares", "sum_squares"),
              (("n",), ("num",), ("k",)), "    return sum(i * i for i in range(1, {0} + 1))",
              lambda n: sum(i * i for i in range(1, n + 1)), lambda r: (r.randint(1, 30),)),
    _CodeTask("find the last digit of a given number", ("last_digit", "get_last_digit", "unit_digit"),
              (("n",), ("num",), ("x",)), "    return abs({0}) % 10", lambda n: abs(n) % 10,
              lambda r: (r.randint(-5000, 99999),)),
]


def _code_draw(r: random.Random) -> tuple[str, str]:
    task = r.choice(_CODE_TASKS)
    name, params = r.choice(task.names), r.choice(task.params)
    tests = []
    for _ in range(3):
        args = task.args(r)
        tests.append(f"assert {name}({', '.join(map(repr, args))}) == {task.ref(*args)!r}")
    lead = r.choice(["Write a function to", "Write a python function to"])
    prompt = f"{lead} {task.text}.\nYour code should pass these tests:\n" + "\n".join(tests)
    code = f"def {name}({', '.join(params)}):\n" + task.body.format(*params)
    return prompt, code


def code_items(n: int = 300) -> list[Item]:
    """MBPP-style requests in the standard MBPP prompt format (text + three asserts); completion is a working
    function whose asserts were computed by an independent reference implementation."""
    return _distinct("code", n, _code_draw)


# --------------------------------------------------------------------------- general

_COUNTRIES = [  # name, capital, continent, main language
    ("France", "Paris", "Europe", "French"), ("Japan", "Tokyo", "Asia", "Japanese"),
    ("Canada", "Ottawa", "North America", "English"), ("Australia", "Canberra", "Oceania", "English"),
    ("Brazil", "Brasília", "South America", "Portuguese"), ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"), ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Peru", "Lima", "South America", "Spanish"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("South Korea", "Seoul", "Asia", "Korean"), ("Portugal", "Lisbon", "Europe", "Portuguese"),
    ("Greece", "Athens", "Europe", "Greek"), ("Poland", "Warsaw", "Europe", "Polish"),
    ("Sweden", "Stockholm", "Europe", "Swedish"), ("Chile", "Santiago", "South America", "Spanish"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Ireland", "Dublin", "Europe", "English"),
    ("Mexico", "Mexico City", "North America", "Spanish"), ("Finland", "Helsinki", "Europe", "Finnish"),
]
_TRANSLATIONS = {  # English word -> (Spanish, French, German, Italian)
    "hello": ("hola", "bonjour", "hallo", "ciao"), "thank you": ("gracias", "merci", "danke", "grazie"),
    "cat": ("gato", "chat", "Katze", "gatto"), "dog": ("perro", "chien", "Hund", "cane"),
    "water": ("agua", "eau", "Wasser", "acqua"), "house": ("casa", "maison", "Haus", "casa"),
    "book": ("libro", "livre", "Buch", "libro"), "bread": ("pan", "pain", "Brot", "pane"),
    "friend": ("amigo", "ami", "Freund", "amico"), "sun": ("sol", "soleil", "Sonne", "sole"),
}
_LANGUAGES = ("Spanish", "French", "German", "Italian")
_DEFINITIONS = [
    ("ephemeral", "lasting for a very short time"), ("benevolent", "well-meaning and kind"),
    ("meticulous", "showing great attention to detail"), ("ubiquitous", "present or found everywhere"),
    ("candid", "truthful and straightforward"), ("resilient", "able to recover quickly from difficulties"),
    ("frugal", "careful and economical with money or resources"), ("verbose", "using more words than needed"),
    ("ambiguous", "open to more than one interpretation"), ("nostalgia", "a sentimental longing for the past"),
    ("empathy", "the ability to understand and share the feelings of another"),
    ("procrastinate", "to delay or postpone doing something"),
]
_SYNONYMS = [("happy", "joyful"), ("big", "large"), ("fast", "quick"), ("smart", "intelligent"),
             ("tired", "exhausted"), ("begin", "start"), ("difficult", "hard"), ("angry", "furious"),
             ("beautiful", "lovely"), ("quiet", "silent")]
_EVENTS = [("did humans first land on the Moon", "1969"), ("did the Berlin Wall fall", "1989"),
           ("did the Titanic sink", "1912"), ("did World War II end", "1945"),
           ("was the United States Declaration of Independence signed", "1776"),
           ("did the French Revolution begin", "1789"), ("did World War I begin", "1914"),
           ("did Columbus first reach the Americas", "1492")]
_PEOPLE_BIOS = [
    ("Marie Curie", "a physicist and chemist who pioneered research on radioactivity and won Nobel Prizes in "
                    "both physics and chemistry"),
    ("Ada Lovelace", "an English mathematician often called the first computer programmer for her notes on "
                     "Charles Babbage's Analytical Engine"),
    ("Leonardo da Vinci", "an Italian Renaissance painter, engineer and inventor who painted the Mona Lisa"),
    ("Nelson Mandela", "a South African anti-apartheid leader who became the country's first Black president in 1994"),
    ("Cleopatra", "the last active ruler of the Ptolemaic Kingdom of Egypt"),
    ("Mahatma Gandhi", "the leader of India's nonviolent movement for independence from British rule"),
    ("William Shakespeare", "an English playwright and poet who wrote Hamlet and Romeo and Juliet"),
    ("Frida Kahlo", "a Mexican painter known for her vivid self-portraits"),
]
_LARGEST = [("ocean on Earth", "the Pacific Ocean"), ("planet in our solar system", "Jupiter"),
            ("country by area", "Russia"), ("continent by area", "Asia"), ("animal that has ever lived",
                                                                         "the blue whale"),
            ("hot desert in the world", "the Sahara")]
_TOPICS = ["the ocean", "autumn leaves", "a rainy afternoon", "friendship", "the city at night", "a lost key",
           "mountains", "a cup of tea", "the first snow", "an old library", "a summer garden", "the moon",
           "a long train ride", "grandmother's kitchen", "a stray dog", "the desert at dawn"]
_FORMS = ["short poem", "haiku", "limerick", "short story", "two-sentence story", "song verse"]
_ACTIVITIES = ["sleeping better", "running a first marathon", "learning a new language", "saving money on groceries",
               "staying focused while studying", "making friends in a new city", "keeping houseplants alive",
               "preparing for a job interview", "reducing stress at work", "traveling on a budget",
               "giving a public speech", "starting a vegetable garden"]
_AUDIENCES = ["a five-year-old", "a high school student", "my grandmother", "a busy manager", "a new employee",
              "someone who has never heard of it"]
_CONCEPTS = ["photosynthesis", "democracy", "inflation", "gravity", "the water cycle", "vaccines", "recycling",
             "climate change", "the internet", "supply and demand", "the seasons", "composting", "elections",
             "tides", "the immune system", "volcanoes"]
_TONES = ["polite", "friendly", "formal", "short", "warm", "firm"]
_EMAILS = [("my landlord", "a broken heater"), ("a coworker", "lunch next week"),
           ("a professor", "an extension for an essay"), ("my team", "tomorrow's meeting"),
           ("a customer", "a delayed order"), ("an old friend", "catching up soon")]
_CITIES = ["Paris", "Tokyo", "Rome", "Lisbon", "Kyoto", "Barcelona", "Istanbul", "Prague", "Cape Town", "Vancouver"]
_PAIRS = [("weather", "climate"), ("a virus", "a bacterium"), ("a crocodile", "an alligator"),
          ("a lake", "a pond"), ("empathy", "sympathy"), ("a simile", "a metaphor"), ("a democracy", "a monarchy"),
          ("baking soda", "baking powder")]
_HISTORY = ["the printing press", "the Roman Empire", "the bicycle", "chocolate", "the Olympic Games", "tea",
            "the telephone", "jazz music", "the Silk Road", "paper money"]
_GENRES = ["mystery", "science fiction", "fantasy", "historical fiction", "poetry", "travel", "cookery",
           "nature", "biography", "humor"]
_READERS = ["teenagers", "a long flight", "someone new to reading", "a book club", "a rainy weekend",
            "a summer holiday"]
_PETS = ["a black cat", "a golden retriever", "a goldfish", "a parrot", "a hamster", "a rabbit"]
_JOBS = ["nurse", "firefighter", "librarian", "chef", "farmer", "pilot", "teacher", "zookeeper", "journalist",
         "park ranger", "architect", "baker"]
_MEALS = ["breakfast", "lunch", "vegetarian dinner", "picnic", "quick weeknight dinner"]
_INGREDIENTS = ["spinach", "lentils", "mushrooms", "sweet potatoes", "chickpeas", "eggs", "rice", "tomatoes",
                "salmon", "apples"]
_PROS_CONS = ["working from home", "living in a big city", "electric cars", "online classes", "owning a dog",
              "public transport", "learning to cook", "getting up early", "social media", "renting a home",
              "traveling alone", "open-plan offices"]
_SEASONS = ["a winter", "a summer", "a rainy spring", "an autumn"]
_SKILLS = ["public speaking", "chess", "drawing", "writing essays", "remembering names", "time management",
           "negotiating", "listening", "photography", "cooking"]

_General = tuple[str, str, list[tuple]]  # prompt format, completion format ("" = unknown), rows

_GENERAL_TEMPLATES: list[_General] = [
    ("What is the capital of {0}?", "The capital of {0} is {1}.", _COUNTRIES),
    ("Which continent is {0} in?", "{0} is in {2}.", _COUNTRIES),
    ("What language do most people speak in {0}?", "Most people in {0} speak {3}.", _COUNTRIES),
    ("How do you say '{0}' in {1}?", "In {1}, '{0}' is '{2}'.",
     [(w, lang, t[i]) for w, t in _TRANSLATIONS.items() for i, lang in enumerate(_LANGUAGES)]),
    ("What does the word '{0}' mean?", "'{0}' means {1}.", _DEFINITIONS),
    ("Give me a synonym for '{0}'.", "A synonym for '{0}' is '{1}'.", _SYNONYMS),
    ("In which year {0}?", "It happened in {1}.", _EVENTS),
    ("Who was {0}?", "{0} was {1}.", _PEOPLE_BIOS),
    ("What is the largest {0}?", "The largest {0} is {1}.", _LARGEST),
    ("Write a {0} about {1}.", "", list(itertools.product(_FORMS, _TOPICS))),
    ("Give me some tips for {0}.", "", [(a,) for a in _ACTIVITIES]),
    ("Explain {0} to {1}.", "", list(itertools.product(_CONCEPTS, _AUDIENCES))),
    ("Write a {0} email to {1} about {2}.", "", [(tone, *email) for tone in _TONES for email in _EMAILS]),
    ("Plan a {0}-day trip to {1}.", "", list(itertools.product(("two", "three", "five"), _CITIES))),
    ("What is the difference between {0} and {1}?", "", _PAIRS),
    ("Summarize the history of {0} in a few sentences.", "", [(h,) for h in _HISTORY]),
    ("Recommend a few {0} books for {1}.", "", list(itertools.product(_GENRES, _READERS))),
    ("Suggest a few names for {0}.", "", [(p,) for p in _PETS]),
    ("Write a thank-you note to {0} for {1}.", "",
     list(itertools.product(("my aunt", "a neighbor", "my teacher", "a colleague"),
                            ("a birthday gift", "helping me move", "a lovely dinner", "their advice")))),
    ("What are some good things to see in {0}?", "", [(c,) for c in _CITIES]),
    ("Describe a typical day for a {0}.", "", [(j,) for j in _JOBS]),
    ("Suggest a {0} recipe using {1}.", "", list(itertools.product(_MEALS, _INGREDIENTS))),
    ("What are the pros and cons of {0}?", "", [(t,) for t in _PROS_CONS]),
    ("What should I pack for {0} trip to {1}?", "", list(itertools.product(_SEASONS, _CITIES))),
    ("How can I get better at {0}?", "", [(skill,) for skill in _SKILLS]),
]


def _general_draw(r: random.Random) -> tuple[str, str]:
    prompt, completion, rows = r.choice(_GENERAL_TEMPLATES)
    row = r.choice(rows)
    return prompt.format(*row), completion.format(*row)


def general_items(n: int = 300) -> list[Item]:
    """Everyday requests with no math or code, the contrast set; completions are filled only for known facts."""
    return _distinct("general", n, _general_draw)
