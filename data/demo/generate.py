#!/usr/bin/env python3
"""Generate the demo catalog (ads.jsonl) and synthetic logged impressions (impressions.jsonl).

Everything here is invented: fictional advertisers on reserved `.example` domains, hand-written
products and copy templates. Standard library only; the output is byte-for-byte reproducible:

    python data/demo/generate.py            # writes next to this file
    python data/demo/generate.py --out DIR

Behaviour model for the impressions: each user has one or two category interests. A user's
history is a walk over the catalog: the next item is usually in the same subcategory as the
current one and close to it in the product list (shoe -> similar shoe -> socks), sometimes any
popular item of the same category, sometimes the user's other interest, rarely anything.
Each impression logs the user's history so far and clicks the next item of the walk; half list
10 logged candidates (the click, 4 same-category items, 5 others), half list none (the system
retrieves from the whole catalog). Popularity and co-visitation learned from the histories are
therefore informative about the clicks.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

SEED = 20250301
N_IMPRESSIONS = 500
N_LOGGED_CANDIDATES = 10
START = datetime(2025, 3, 1, tzinfo=timezone.utc)

# category: (id prefix, bid range in $ CPC, advertisers, templates, products as (subcategory, name, price))
# Templates use {name}, {price} ("$49"), {pct} ("20%"), {adv}, {sub}.
CATALOG: dict[str, tuple[str, tuple[float, float], list[str], list[str], list[tuple[str, str, int]]]] = {
    "running shoes": (
        "run",
        (0.4, 1.6),
        ["Stridewell", "TrailFox", "Pacemark", "Cadence Athletic"],
        [
            "The {name} gives you a soft landing and a fast toe-off. Now {price} with free returns.",
            "Take {pct} off the {name} this week only. Sizes 5 to 14 in stock.",
            "Built for long miles: the {name} from {adv}. Free shipping on orders over $75.",
            "Runners rate the {name} 4.7 out of 5. Grab a pair for {price}.",
            "Fresh colours of the {name} just landed. Members save {pct}.",
        ],
        [
            ("road", "CloudRunner 3 road shoe", 129), ("road", "Tempo Glide daily trainer", 119),
            ("road", "Metro Miles cushioned trainer", 99), ("road", "Stride Lite neutral shoe", 89),
            ("road", "Everyday Pace stability shoe", 139), ("road", "Pavement Pro max-cushion shoe", 159),
            ("trail", "Ridgeback trail shoe", 139), ("trail", "Mudguard GTX waterproof trail shoe", 169),
            ("trail", "Switchback grip trail runner", 129), ("trail", "Summit Scramble mountain shoe", 149),
            ("trail", "Canyon Lite trail racer", 119),
            ("racing", "Carbon Sprint plate racer", 229), ("racing", "Velocity Elite marathon shoe", 249),
            ("racing", "Track Spike 5 sprint spikes", 99), ("racing", "Tempo Flyer lightweight racer", 179),
            ("accessories", "Blister-Free running socks (3 pack)", 24), ("accessories", "Hydration vest 5L", 79),
            ("accessories", "Reflective night-run jacket", 89), ("accessories", "Merino trail socks", 19),
            ("accessories", "Running belt with bottle holder", 29), ("accessories", "Insoles for flat feet", 39),
            ("accessories", "Compression calf sleeves", 34), ("accessories", "Sweat-wicking running cap", 22),
            ("accessories", "GPS running watch Pace 2", 199), ("accessories", "Foam recovery roller", 35),
        ],
    ),
    "laptops": (
        "lap",
        (1.2, 3.0),
        ["Northbyte", "Lumen Computing", "Kestrel Systems"],
        [
            "The {name} is thin, quiet and lasts all day. Yours from {price}.",
            "Save {pct} on the {name} with student pricing from {adv}.",
            "Work anywhere with the {name}: 16 GB memory, fast SSD, {price}.",
            "Trade in your old laptop and get up to {pct} off the {name}.",
            "The {name} ships free in two days. 30-day no-quibble returns.",
        ],
        [
            ("ultrabook", "Airframe 13 ultrabook", 999), ("ultrabook", "Featherbook 14 OLED", 1199),
            ("ultrabook", "Slimline X1 business ultrabook", 1349), ("ultrabook", "Pocketbook 12 travel laptop", 799),
            ("ultrabook", "Everyday 15 thin-and-light", 699),
            ("gaming", "Raptor 16 RTX gaming laptop", 1799), ("gaming", "Vortex 17 240Hz gaming laptop", 2199),
            ("gaming", "Blitz 15 entry gaming laptop", 1099), ("gaming", "Titan Pro 18 desktop replacement", 2799),
            ("gaming", "Strike 14 compact gaming laptop", 1499),
            ("chromebook", "Cloudbook 14 Chromebook", 329), ("chromebook", "Schoolmate 11 rugged Chromebook", 249),
            ("chromebook", "Flip 13 convertible Chromebook", 449),
            ("workstation", "Forge 16 mobile workstation", 2499), ("workstation", "Studio 14 creator laptop", 1899),
            ("workstation", "DataPro 17 workstation", 3199),
            ("accessories", "USB-C docking station", 149), ("accessories", "Laptop sleeve 14 inch", 29),
            ("accessories", "Wireless ergonomic mouse", 49), ("accessories", "Aluminium laptop stand", 39),
            ("accessories", "65W GaN travel charger", 45), ("accessories", "Mechanical low-profile keyboard", 99),
            ("accessories", "27 inch 4K USB-C monitor", 379), ("accessories", "Noise-cancelling headset", 129),
            ("accessories", "1 TB portable SSD", 109),
        ],
    ),
    "coffee": (
        "cof",
        (0.2, 1.0),
        ["Ember & Bean", "Highland Roasters", "Crema Co."],
        [
            "Roasted on Monday, at your door by Thursday: {name}, {price}.",
            "Try the {name} and save {pct} on your first subscription box.",
            "{adv} sources the {name} directly from the farm. Free delivery over $30.",
            "Bright, sweet and balanced: the {name}. Now {price}.",
            "Start your mornings better with the {name}. Subscribers always get {pct} off.",
        ],
        [
            ("beans", "Ethiopia Yirgacheffe whole beans 250g", 16), ("beans", "Colombia Huila medium roast 1kg", 39),
            ("beans", "Sumatra dark roast 500g", 21), ("beans", "House espresso blend 1kg", 34),
            ("beans", "Decaf Swiss Water beans 250g", 15), ("beans", "Kenya AA single origin 250g", 19),
            ("beans", "Guatemala Antigua 500g", 22),
            ("brewing", "Pour-over dripper and filters set", 35), ("brewing", "French press 1L", 29),
            ("brewing", "Burr grinder with 40 settings", 119), ("brewing", "Gooseneck electric kettle", 69),
            ("brewing", "Cold brew jar 1.5L", 25), ("brewing", "Digital coffee scale", 39),
            ("brewing", "AeroPress-style travel brewer", 32),
            ("machines", "Home espresso machine with steam wand", 449), ("machines", "Bean-to-cup automatic machine", 799),
            ("machines", "Compact capsule machine", 99), ("machines", "Drip coffee maker with timer", 79),
            ("subscriptions", "Monthly roaster's choice subscription", 18), ("subscriptions", "Espresso lover's subscription", 24),
            ("subscriptions", "Decaf subscription box", 17), ("subscriptions", "Office coffee plan 5kg", 149),
            ("accessories", "Double-wall glass cups (set of 4)", 28), ("accessories", "Milk frother wand", 15),
            ("accessories", "Insulated travel mug 450ml", 27),
        ],
    ),
    "travel": (
        "trv",
        (1.0, 3.0),
        ["Wayfarer Air", "Bluecove Hotels", "Roamly", "Atlas Rail"],
        [
            "Book the {name} today and save {pct}. Free cancellation up to 48 hours before.",
            "{name} from {price} per person. Limited seats at this price.",
            "Members get {pct} off the {name} plus late checkout.",
            "Plan less, see more: the {name} with {adv}, from {price}.",
            "Your next trip starts here: {name}. Prices include taxes and fees.",
        ],
        [
            ("flights", "Return flights to Lisbon", 189), ("flights", "Non-stop flights to New York", 429),
            ("flights", "Weekend flights to Barcelona", 149), ("flights", "Flights to Tokyo in economy plus", 899),
            ("flights", "Island-hopper flight pass", 299),
            ("hotels", "Seafront hotel in Nice, 3 nights", 420), ("hotels", "City-centre hotel in Prague, 2 nights", 180),
            ("hotels", "Boutique hotel in Kyoto, 4 nights", 760), ("hotels", "Mountain lodge in the Alps, 5 nights", 890),
            ("hotels", "Airport hotel with parking", 99),
            ("packages", "7-night Greek islands package", 1199), ("packages", "Iceland northern lights tour", 1490),
            ("packages", "Family beach holiday in Mallorca", 1850), ("packages", "Safari week in Kenya", 3400),
            ("packages", "Amalfi coast food tour", 1650),
            ("rail", "Interrail 7-day global pass", 335), ("rail", "Sleeper train Vienna to Venice", 159),
            ("rail", "Scenic Swiss rail pass", 275), ("rail", "London to Paris high-speed return", 119),
            ("cruises", "Norwegian fjords cruise, 8 nights", 1390), ("cruises", "Caribbean cruise, 7 nights", 980),
            ("cruises", "Danube river cruise, 6 nights", 1540),
            ("extras", "Travel insurance, annual multi-trip", 79), ("extras", "Airport lounge access pass", 45),
            ("extras", "eSIM with 10 GB for Europe", 19),
        ],
    ),
    "video games": (
        "game",
        (0.5, 2.0),
        ["Pixelforge Studios", "Nebula Games", "Retrovault"],
        [
            "{name}: out now for {price}. Pre-load tonight.",
            "Save {pct} on {name} during the spring sale.",
            "Rated 9/10 by players. Play {name} from {adv} today.",
            "{name} is {pct} off until Sunday. Includes the bonus soundtrack.",
            "Join millions of players in {name}. Only {price}.",
        ],
        [
            ("rpg", "Emberfall: Chronicles of Ash", 59), ("rpg", "Starbound Odyssey deluxe edition", 79),
            ("rpg", "Hollow Crown remastered", 39), ("rpg", "Tides of Veyra", 49), ("rpg", "Runebound Tactics", 29),
            ("shooter", "Iron Protocol", 69), ("shooter", "Neon Siege season pass", 24),
            ("shooter", "Frontline 1944", 39), ("shooter", "Orbital Strike VR", 34),
            ("racing", "Apex Circuit 2", 59), ("racing", "Rally Dust", 29), ("racing", "Turbo Kart Party", 39),
            ("indie", "Lanterns of the Deep", 19), ("indie", "Pocket Farm Stories", 14),
            ("indie", "Pixel Dungeon Deluxe", 9), ("indie", "Cozy Cat Cafe", 12),
            ("retro", "Retrovault arcade collection vol. 1", 29), ("retro", "16-bit platformer bundle", 19),
            ("retro", "Classic puzzle pack", 9),
            ("hardware", "Wireless pro controller", 69), ("hardware", "Gaming headset with 7.1 surround", 89),
            ("hardware", "1 TB console storage expansion", 149), ("hardware", "Charging dock for two controllers", 29),
            ("hardware", "RGB mechanical gaming keyboard", 119), ("hardware", "Ultralight gaming mouse", 59),
        ],
    ),
    "kitchen": (
        "kit",
        (0.4, 1.5),
        ["Copperleaf Kitchen", "Ovenly", "Slice & Simmer"],
        [
            "Cook like a pro with the {name}. Now {price}, lifetime warranty.",
            "Spring kitchen sale: {pct} off the {name}.",
            "The {name} from {adv} is dishwasher-safe and built to last.",
            "Home cooks love the {name}. Get it for {price} with free delivery.",
            "Upgrade your kitchen: {name}, {pct} off for newsletter subscribers.",
        ],
        [
            ("cookware", "Cast iron skillet 28cm", 49), ("cookware", "Tri-ply stainless pan set (5 pieces)", 229),
            ("cookware", "Non-stick frying pan 24cm", 35), ("cookware", "Enamelled Dutch oven 5L", 129),
            ("cookware", "Carbon steel wok", 59), ("cookware", "Copper saucepan 2L", 149),
            ("knives", "Chef's knife 20cm, Damascus steel", 139), ("knives", "Santoku knife 18cm", 89),
            ("knives", "Magnetic knife block", 59), ("knives", "Whetstone sharpening kit", 45),
            ("knives", "Bread knife 23cm", 49),
            ("appliances", "Stand mixer 5.5L", 399), ("appliances", "High-speed blender", 189),
            ("appliances", "Air fryer 6L", 129), ("appliances", "Sous-vide precision cooker", 149),
            ("appliances", "Multi-cooker 8-in-1", 119),
            ("baking", "Sourdough starter kit", 29), ("baking", "Non-stick bakeware set", 69),
            ("baking", "Banneton proofing basket", 22), ("baking", "Digital kitchen scale", 25),
            ("storage", "Glass meal-prep containers (10 pack)", 39), ("storage", "Vacuum sealer", 89),
            ("storage", "Bamboo spice rack with 20 jars", 49), ("storage", "Reusable silicone food bags", 19),
            ("storage", "Airtight pantry canisters (6 pack)", 55),
        ],
    ),
    "fitness": (
        "fit",
        (0.4, 1.8),
        ["IronPeak", "FlexFlow", "Pulsefit Gyms"],
        [
            "Train at home with the {name}. {price}, free delivery and setup.",
            "New year, new routine: {pct} off the {name}.",
            "The {name} from {adv}: gym quality, small footprint.",
            "Join today and get {pct} off the {name}. Cancel any time.",
            "Stronger every week with the {name}. Only {price}.",
        ],
        [
            ("strength", "Adjustable dumbbells 2-24kg", 349), ("strength", "Kettlebell 16kg", 59),
            ("strength", "Foldable weight bench", 179), ("strength", "Resistance band set", 29),
            ("strength", "Pull-up bar for doorways", 35), ("strength", "Olympic barbell and plates 100kg", 499),
            ("cardio", "Folding treadmill", 699), ("cardio", "Indoor cycling bike", 549),
            ("cardio", "Rowing machine with app", 899), ("cardio", "Jump rope with counter", 15),
            ("yoga", "Non-slip yoga mat 6mm", 45), ("yoga", "Cork yoga blocks (pair)", 25),
            ("yoga", "Online yoga classes, 3 months", 60), ("yoga", "Meditation cushion", 39),
            ("memberships", "Gym membership, 12 months", 399), ("memberships", "Personal training pack (5 sessions)", 250),
            ("memberships", "Climbing gym day pass 10-pack", 140), ("memberships", "Swimming pool monthly pass", 45),
            ("nutrition", "Whey protein 2kg, chocolate", 49), ("nutrition", "Plant protein 1kg, vanilla", 39),
            ("nutrition", "Electrolyte tablets (60)", 19), ("nutrition", "Creatine monohydrate 500g", 25),
            ("wearables", "Heart-rate chest strap", 69), ("wearables", "Fitness tracker band", 79),
            ("wearables", "Smart scale with body composition", 59),
        ],
    ),
    "books": (
        "book",
        (0.2, 0.9),
        ["Inkwell Books", "Paperlane", "Chapter House Audio"],
        [
            "The book everyone is talking about: {name}. Hardcover {price}.",
            "Get {name} with {pct} off this weekend.",
            "Listen to {name} free for 30 days with {adv}.",
            "Shortlisted for three prizes: {name}. Paperback from {price}.",
            "{name} is in stock and ships today. Members save {pct}.",
        ],
        [
            ("fiction", "The Salt Orchard, a novel", 24), ("fiction", "Midnight at the Lighthouse", 18),
            ("fiction", "A House of Small Weathers", 22), ("fiction", "The Cartographer's Daughter", 20),
            ("mystery", "Death on the Night Ferry", 16), ("mystery", "The Ninth Key", 15),
            ("mystery", "Cold Case in Kestrel Bay", 17), ("mystery", "The Silent Auction Murders", 14),
            ("science fiction", "Orbitfall", 19), ("science fiction", "The Last Colony Ship", 18),
            ("science fiction", "Glass Moons", 16), ("science fiction", "Signal from Tau Ceti", 17),
            ("non-fiction", "The Sleep Code", 21), ("non-fiction", "Money Without Panic", 19),
            ("non-fiction", "A Short History of Bread", 25), ("non-fiction", "How Rivers Made Cities", 27),
            ("children", "Pip the Brave Hedgehog", 12), ("children", "Rocket Readers box set", 35),
            ("children", "The Big Book of Dinosaurs", 16),
            ("cookbooks", "Weeknight Vegetarian", 28), ("cookbooks", "The Sourdough Year", 30),
            ("cookbooks", "One-Pan Dinners", 22),
            ("audiobooks", "Audiobook membership, 1 credit a month", 15), ("audiobooks", "Great Speeches audio collection", 12),
            ("audiobooks", "Learn Spanish audio course", 45),
        ],
    ),
    "pets": (
        "pet",
        (0.3, 1.2),
        ["Pawsome Supply", "Whisker & Wag", "Tailwind Vets"],
        [
            "Happy pets, happy homes: {name} for {price}.",
            "Subscribe and save {pct} on the {name}. Delivered monthly.",
            "Vets recommend the {name} from {adv}.",
            "Treat your best friend to the {name}. {pct} off first orders.",
            "The {name} is back in stock. Free shipping over $40.",
        ],
        [
            ("dog food", "Grain-free dog food 12kg", 64), ("dog food", "Puppy starter kibble 3kg", 24),
            ("dog food", "Senior dog food 6kg", 42), ("dog food", "Freeze-dried dog treats", 14),
            ("cat food", "Indoor cat dry food 4kg", 32), ("cat food", "Wet cat food variety pack (24)", 29),
            ("cat food", "Hairball-control cat treats", 8),
            ("toys", "Indestructible chew toy", 16), ("toys", "Interactive laser cat toy", 22),
            ("toys", "Puzzle feeder for dogs", 19), ("toys", "Catnip mice (6 pack)", 9),
            ("beds", "Orthopaedic dog bed, large", 89), ("beds", "Heated cat bed", 45),
            ("beds", "Cat tree with scratching posts", 109),
            ("health", "Flea and tick treatment, 3 months", 39), ("health", "Dog dental chews (30)", 18),
            ("health", "Pet insurance, monthly plan", 19), ("health", "Online vet consultation", 29),
            ("accessories", "No-pull dog harness", 32), ("accessories", "GPS pet tracker", 59),
            ("accessories", "Self-cleaning litter box", 249), ("accessories", "Stainless steel pet fountain", 35),
            ("accessories", "Retractable dog lead 5m", 21), ("accessories", "Travel pet carrier", 49),
            ("accessories", "Automatic pet feeder", 79),
        ],
    ),
    "gardening": (
        "gdn",
        (0.3, 1.2),
        ["Greenthumb Co.", "Rootstock Nursery", "Bloomcraft"],
        [
            "Grow more this season with the {name}. Just {price}.",
            "Spring planting sale: {pct} off the {name}.",
            "The {name} from {adv}, delivered ready to plant.",
            "Gardeners give the {name} five stars. Now {price}.",
            "Order the {name} by Friday and save {pct}.",
        ],
        [
            ("seeds", "Heirloom tomato seed collection", 12), ("seeds", "Wildflower meadow seed mix 1kg", 29),
            ("seeds", "Herb garden seed kit", 15), ("seeds", "Salad leaves seed tape", 7),
            ("plants", "Bare-root rose bushes (3)", 39), ("plants", "Dwarf apple tree", 45),
            ("plants", "Lavender plug plants (12)", 24), ("plants", "Raspberry canes (10)", 27),
            ("plants", "Flowering bulbs autumn mix (100)", 35),
            ("tools", "Stainless steel hand tool set", 39), ("tools", "Bypass pruning shears", 25),
            ("tools", "Cordless hedge trimmer", 129), ("tools", "Ergonomic garden kneeler", 34),
            ("tools", "Expanding garden hose 30m", 45),
            ("lawn", "Cordless lawn mower 40cm", 299), ("lawn", "Lawn feed and weed 10kg", 32),
            ("lawn", "Robot lawn mower", 799),
            ("growing", "Raised garden bed kit", 89), ("growing", "Compost bin 300L", 59),
            ("growing", "Peat-free compost 50L", 12), ("growing", "Mini greenhouse with shelves", 79),
            ("growing", "Self-watering planters (set of 3)", 42),
            ("outdoor", "Solar garden lights (10 pack)", 29), ("outdoor", "Bird feeder station", 49),
            ("outdoor", "Water butt 200L with stand", 69),
        ],
    ),
    "mobile plans": (
        "mob",
        (1.0, 3.0),
        ["Skyline Mobile", "Orbit Wireless", "Zipcell"],
        [
            "Switch to the {name} for {price} a month. Keep your number.",
            "Get {pct} off the {name} for your first 6 months.",
            "{adv} {name}: 5G included, no annual contract.",
            "The {name} now comes with EU roaming at no extra cost. {price} a month.",
            "Bring a friend and you both get {pct} off the {name}.",
        ],
        [
            ("sim only", "SIM-only 10 GB plan", 10), ("sim only", "SIM-only 50 GB plan", 18),
            ("sim only", "SIM-only unlimited data plan", 30), ("sim only", "SIM-only 3 GB starter plan", 6),
            ("sim only", "Pay-as-you-go SIM with $10 credit", 10),
            ("family", "Family plan for 4 lines", 80), ("family", "Family plan for 2 lines", 45),
            ("family", "Kids' safe plan with parental controls", 9),
            ("phone plans", "Flagship phone with 100 GB plan", 59), ("phone plans", "Mid-range phone with 30 GB plan", 29),
            ("phone plans", "Foldable phone with unlimited plan", 79), ("phone plans", "Refurbished phone with 20 GB plan", 19),
            ("data", "4G home broadband box", 25), ("data", "5G home broadband", 35),
            ("data", "Tablet data plan 20 GB", 12), ("data", "Mobile hotspot device and 50 GB", 22),
            ("travel", "International roaming add-on", 8), ("travel", "Travel eSIM 20 GB worldwide", 39),
            ("travel", "International calling bundle", 5),
            ("business", "Business plan with 5 lines", 120), ("business", "Business unlimited single line", 35),
            ("extras", "Device insurance for phones", 9), ("extras", "Streaming add-on bundle", 10),
            ("extras", "Unlimited international texts", 3), ("extras", "Extra 10 GB data boost", 5),
        ],
    ),
    "streaming": (
        "str",
        (0.5, 2.0),
        ["Streamora", "Cinebox", "Tunewave"],
        [
            "Watch the {name} free for 7 days, then {price} a month.",
            "Save {pct} with the annual {name}.",
            "New originals every week on the {name} from {adv}.",
            "Students get {pct} off the {name}. Cancel any time.",
            "The {name}: ad-free, offline downloads, {price} a month.",
        ],
        [
            ("video", "Streamora standard plan", 11), ("video", "Streamora premium 4K plan", 18),
            ("video", "Cinebox basic with ads plan", 6), ("video", "Cinebox family plan", 15),
            ("video", "Documentary channel add-on", 5), ("video", "Classic films library pass", 7),
            ("music", "Tunewave individual plan", 10), ("music", "Tunewave family plan", 16),
            ("music", "Tunewave student plan", 5), ("music", "Hi-fi lossless music upgrade", 4),
            ("sports", "Live football season pass", 30), ("sports", "Motorsport live streaming pass", 20),
            ("sports", "Tennis grand slams pass", 15), ("sports", "Basketball league pass", 25),
            ("kids", "Kids' cartoons channel", 5), ("kids", "Learning videos for kids", 6),
            ("kids", "Kids' audiobooks and songs plan", 4),
            ("podcasts", "Premium podcasts subscription", 5), ("podcasts", "True crime podcasts bundle", 3),
            ("podcasts", "Ad-free news podcasts", 4),
            ("bundles", "Video and music bundle", 22), ("bundles", "Everything bundle with sports", 45),
            ("bundles", "Student video and music bundle", 9), ("bundles", "Gaming and video bundle", 25),
            ("bundles", "Annual streaming gift card", 99),
        ],
    ),
}
PERCENTS = [10, 15, 20, 25, 30, 40]


@dataclass(frozen=True)
class Item:
    ad_id: str
    category: str
    subcategory: str
    index: int  # position in its category's product list: neighbours are closely related


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def build_ads(rng: random.Random) -> list[dict[str, object]]:
    ads: list[dict[str, object]] = []
    for category, (prefix, (bid_lo, bid_hi), advertisers, templates, products) in CATALOG.items():
        for i, (sub, name, price) in enumerate(products, start=1):
            adv = advertisers[rng.randrange(len(advertisers))]
            text = rng.choice(templates).format(
                name=name, price=f"${price}", pct=f"{rng.choice(PERCENTS)}%", adv=adv, sub=sub
            )
            ads.append(
                {
                    "ad_id": f"{prefix}-{i:03d}",
                    "title": f"{name} | {adv}",
                    "text": text,
                    "category": category,
                    "subcategory": sub,
                    "advertiser": adv,
                    "bid": round(rng.uniform(bid_lo, bid_hi), 2),
                    "landing_url": f"https://www.{_slug(adv)}.example/{_slug(category)}/{_slug(name)}",
                }
            )
    return ads


class Walk:
    """The behaviour model: popularity per item and the next-item distribution."""

    def __init__(self, items: list[Item], rng: random.Random):
        self.items = items
        self.by_category: dict[str, list[Item]] = {}
        for it in items:
            self.by_category.setdefault(it.category, []).append(it)
        # Zipf-like popularity within each category over a random order of its items.
        self.popularity: dict[str, float] = {}
        for members in self.by_category.values():
            order = list(range(len(members)))
            rng.shuffle(order)
            for rank, j in enumerate(order, start=1):
                self.popularity[members[j].ad_id] = 1.0 / rank**0.8
        self.rng = rng

    def _pick(self, pool: list[Item], weights: list[float], seen: set[str]) -> Item | None:
        options = [(it, w) for it, w in zip(pool, weights) if it.ad_id not in seen and w > 0]
        if not options:
            return None
        return self.rng.choices([it for it, _ in options], weights=[w for _, w in options])[0]

    def popular_in(self, category: str, seen: set[str]) -> Item | None:
        pool = self.by_category[category]
        return self._pick(pool, [self.popularity[it.ad_id] for it in pool], seen)

    def next(self, current: Item, interests: list[str], seen: set[str]) -> Item:
        u = self.rng.random()
        choice: Item | None = None
        if u < 0.6:  # a close neighbour in the same subcategory
            pool = [it for it in self.by_category[current.category] if it.subcategory == current.subcategory]
            weights = [self.popularity[it.ad_id] / abs(it.index - current.index) if it != current else 0.0 for it in pool]
            choice = self._pick(pool, weights, seen)
        elif u < 0.82:  # anything popular in the same category
            choice = self.popular_in(current.category, seen)
        elif u < 0.96:  # the user's other interest
            choice = self.popular_in(self.rng.choice(interests), seen)
        if choice is None:  # rare noise, or the preferred pool is used up
            choice = self._pick(self.items, [self.popularity[it.ad_id] for it in self.items], seen)
        assert choice is not None
        return choice


def build_impressions(ads: list[dict[str, object]], rng: random.Random) -> list[dict[str, object]]:
    items: list[Item] = []
    counters: dict[str, int] = {}
    for ad in ads:
        cat, sub = str(ad["category"]), str(ad["subcategory"])
        counters[cat] = counters.get(cat, 0) + 1
        items.append(Item(str(ad["ad_id"]), cat, sub, counters[cat]))
    walk = Walk(items, rng)
    categories = list(CATALOG)
    category_weights = [rng.uniform(0.5, 2.0) for _ in categories]

    events: list[tuple[datetime, str, list[str], list[str], str]] = []  # (time, user, history, candidates, clicked)
    user = 0
    while len(events) < N_IMPRESSIONS:
        user += 1
        user_id = f"u{user:04d}"
        interests = rng.sample(categories, 1) if rng.random() < 0.4 else _two(rng, categories, category_weights)
        length = rng.randint(5, 16)
        first = walk.popular_in(interests[0], set())
        assert first is not None
        sequence, seen = [first], {first.ad_id}
        while len(sequence) < length:
            step = walk.next(sequence[-1], interests, seen)
            sequence.append(step)
            seen.add(step.ad_id)
        clock = START + timedelta(days=rng.uniform(0, 27))
        times = []
        for _ in sequence:
            clock += timedelta(minutes=rng.uniform(2, 600))
            times.append(clock.replace(microsecond=0))
        n_imps = min(rng.randint(2, 5), len(sequence) - 2, N_IMPRESSIONS - len(events))
        for t in sorted(rng.sample(range(2, len(sequence)), n_imps)):
            history = [it.ad_id for it in sequence[:t]]
            clicked = sequence[t]
            candidates = _candidates(walk, clicked, set(history), rng) if rng.random() < 0.5 else []
            events.append((times[t], user_id, history, candidates, clicked.ad_id))

    events.sort(key=lambda e: (e[0], e[1]))
    return [
        {
            "impression_id": f"imp{n:04d}",
            "user_id": user_id,
            "timestamp": when.isoformat(),
            "history": history,
            "candidates": candidates,
            "clicked": [clicked],
        }
        for n, (when, user_id, history, candidates, clicked) in enumerate(events, start=1)
    ]


def _two(rng: random.Random, categories: list[str], weights: list[float]) -> list[str]:
    first = rng.choices(categories, weights=weights)[0]
    rest = [c for c in categories if c != first]
    return [first, rng.choices(rest, weights=[w for c, w in zip(categories, weights) if c != first])[0]]


def _candidates(walk: Walk, clicked: Item, history: set[str], rng: random.Random) -> list[str]:
    """The click, 4 items of its category and 5 others, none from the history, in shuffled order."""
    taken = set(history) | {clicked.ad_id}
    chosen = [clicked.ad_id]
    same = [it for it in walk.by_category[clicked.category] if it.ad_id not in taken]
    for it in rng.sample(same, min(4, len(same))):
        chosen.append(it.ad_id)
        taken.add(it.ad_id)
    others = [it for it in walk.items if it.ad_id not in taken and it.category != clicked.category]
    chosen += [it.ad_id for it in rng.sample(others, N_LOGGED_CANDIDATES - len(chosen))]
    rng.shuffle(chosen)
    return chosen


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: Path, *, seed: int = SEED) -> tuple[int, int]:
    rng = random.Random(seed)
    ads = build_ads(rng)
    impressions = build_impressions(ads, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "ads.jsonl", ads)
    _write_jsonl(out_dir / "impressions.jsonl", impressions)
    return len(ads), len(impressions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args()
    n_ads, n_imps = generate(a.out, seed=a.seed)
    print(f"wrote {n_ads} ads and {n_imps} impressions to {a.out}")


if __name__ == "__main__":
    main()
