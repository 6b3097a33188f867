"""Word pools for the synthetic world (all invented here; nothing is taken from LoCoMo).

Pools are disjoint where it matters: speaker names, partner names and pet names never
overlap, and distractor lines never contain any slot value, so a value appearing in a
turn means that turn carries a fact.
"""

# Speaker first names (80). Together with LAST_NAMES they give distinct speakers per world.
FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Keira", "Luca", "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Wes", "Xenia", "Yusuf", "Zara", "Arjun", "Bianca", "Colin", "Daria",
    "Emil", "Fiona", "Gavin", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Marco", "Nadia",
    "Oscar", "Priya", "Rafael", "Selma", "Tobias", "Uma", "Viktor", "Wendy", "Yara", "Zane",
    "Amira", "Boris", "Carmen", "Diego", "Esther", "Felix", "Gloria", "Hugo", "Irene", "Jasper",
    "Kara", "Leon", "Mina", "Nico", "Orla", "Pedro", "Rhea", "Stefan", "Talia", "Ulrich",
    "Valeria", "Walter", "Ximena", "Yosef", "Zoe", "Anton", "Beatrix", "Cyrus", "Delia", "Eamon",
)

# 41 last names (a prime count, coprime with len(FIRST_NAMES) + 1, see names.py).
LAST_NAMES = (
    "Park", "Novak", "Reyes", "Lindqvist", "Okafor", "Brennan", "Takeda", "Moreau", "Haddad",
    "Kowalski", "Santos", "Iversen", "Mensah", "Duarte", "Falk", "Nakamura", "Oduya", "Petrov",
    "Quintero", "Rasmussen", "Sato", "Tran", "Ulloa", "Varga", "Weber", "Yilmaz", "Zhou",
    "Abbott", "Bjork", "Castillo", "Dunn", "Ekström", "Fischer", "Grant", "Holm", "Ibarra",
    "Jensen", "Keller", "Lam", "Marsh", "Nolan",
)

PARTNER_NAMES = (
    "Sam", "Jordan", "Riley", "Casey", "Morgan", "Avery", "Jamie", "Robin", "Kendall", "Harper",
    "Reese", "Dakota", "Emerson", "Finley", "Hayden", "Logan", "Parker", "Rowan", "Sage", "Skyler",
    "Blake", "Cameron", "Drew", "Elliot", "Frankie", "Gray", "Jesse", "Lane", "Marlow", "Noel",
)

PET_NAMES = (
    "Rex", "Milo", "Luna", "Biscuit", "Pepper", "Ziggy", "Noodle", "Waffles", "Clover", "Mochi",
    "Bandit", "Pickles", "Juniper", "Tofu", "Gizmo", "Maple", "Sprout", "Nugget", "Olive", "Pumpkin",
    "Rocket", "Shadow", "Toffee", "Wiggles", "Button", "Comet", "Dash", "Fudge", "Hazel", "Kiwi",
    "Marble", "Peanut", "Pip", "Scout", "Sunny", "Truffle", "Wren", "Bean", "Cosmo", "Domino",
)

SPECIES = ("dog", "cat", "rabbit", "parrot", "hamster", "turtle", "ferret", "gecko")

CITIES = (
    "Denver", "Portland", "Austin", "Boston", "Seattle", "Chicago", "Atlanta", "Phoenix",
    "Nashville", "Minneapolis", "Pittsburgh", "San Diego", "Baltimore", "Sacramento", "Tucson",
    "Raleigh", "Madison", "Omaha", "Richmond", "Boise", "Albuquerque", "Savannah", "Spokane",
    "Burlington", "Toronto", "Dublin", "Lisbon", "Melbourne", "Vancouver", "Edinburgh",
)

JOBS = (
    "nurse", "teacher", "software engineer", "accountant", "chef", "electrician",
    "graphic designer", "librarian", "pharmacist", "architect", "dentist", "paramedic",
    "journalist", "plumber", "veterinarian", "barista", "lawyer", "data analyst",
    "physiotherapist", "carpenter", "translator", "pilot", "florist", "mechanic", "social worker",
)

CARS = (
    "Honda Civic", "Toyota Corolla", "Ford Focus", "Subaru Outback", "Mazda 3", "Volkswagen Golf",
    "Kia Soul", "Tesla Model 3", "Hyundai Elantra", "Nissan Leaf", "Jeep Wrangler", "Volvo XC40",
    "Mini Cooper", "Chevrolet Bolt", "Skoda Octavia",
)

FOODS = (
    "sushi", "tacos", "lasagna", "ramen", "curry", "paella", "dumplings", "pancakes", "falafel",
    "risotto", "burritos", "pho", "gnocchi", "shakshuka", "enchiladas", "biryani", "pierogi",
    "moussaka", "goulash", "bibimbap", "ceviche", "empanadas", "laksa", "tagine", "ratatouille",
)

BOOK_ADJ = (
    "Quiet", "Red", "Silent", "Hidden", "Last", "Broken", "Golden", "Distant", "Hollow", "Winter",
    "Salt", "Iron", "Paper", "Glass", "Seventh",
)
BOOK_NOUN = (
    "Harbor", "Lantern", "River", "Orchard", "Bridge", "Compass", "Garden", "Tide", "Mountain",
    "Letter", "Signal", "Meadow", "Tower", "Island", "Archive",
)

HOBBIES = (
    "pottery", "chess", "gardening", "knitting", "yoga", "photography", "rock climbing",
    "bird watching", "watercolor painting", "bread baking", "cycling", "swimming", "archery",
    "fencing", "woodworking", "calligraphy", "origami", "skateboarding", "kayaking", "juggling",
)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Small talk: no slot values, no names, no facts.
GREETINGS = (
    "Hi {other}! Good to hear from you.", "Hey {other}, how are you doing?",
    "Hello {other}! How have you been?", "Hey {other}! Long time no talk.",
)
GREETING_REPLIES = (
    "Hi {other}! I'm doing well, thanks.", "Hey! All good here, thanks for asking.",
    "Hello! Pretty good, how about you?", "Hey {other}! Nice to hear from you too.",
)
OPENERS = (
    "The weather has been so grey lately.", "Did you watch anything good on TV this week?",
    "I could really use a long nap right now.", "Have you been sleeping well?",
    "It has been such a busy week.", "The traffic this morning was awful.",
    "Do you have plans for the weekend?", "I need more coffee today.",
    "It was so windy outside earlier.", "I finally cleaned the whole kitchen.",
    "Have you tried any new snacks lately?", "My phone battery keeps dying.",
    "It rained all afternoon here.", "I keep forgetting to water the plants.",
    "Any good podcasts you would recommend?", "The sunset was really pretty tonight.",
)
REPLIES = (
    "Same here, honestly.", "Not really, just the usual.", "Ha, I know what you mean.",
    "Nothing special, to be honest.", "Yes, it has been a lot.", "I hear you.",
    "Oh, that sounds nice.", "Maybe, I have not decided yet.", "Tell me about it.",
    "That happens to me all the time.", "True, it has been like that for days.",
)
CLOSINGS = (
    "Anyway, I have to run. Talk soon!", "Great catching up. Bye for now!",
    "I should go, but let's talk again soon.", "Take care, talk later!",
)
REACT_GOOD = (
    "That's great news!", "Wow, congrats!", "Nice, good for you!", "Oh, that sounds lovely.",
)
REACT_SAD = ("Oh no, I'm so sorry to hear that.", "That's tough. I hope you're okay.")
REACT_MEH = ("Oh, really? Fair enough.", "Okay, that makes sense.", "Huh, I did not expect that.")
GENERIC_ASKS = (
    "Any news since we last talked?", "What have you been up to?", "Anything new with you?",
)
