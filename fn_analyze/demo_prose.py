"""Plain English prose for the demo's general-text retention set (`general.jsonl`), written here.

Forgetting is measured as the shift of the loss on ordinary text, every token scored. A
short-answer retention set cannot tell forgetting from learning the short-answer format, so
this prose has no questions, answers, reviews or sequences in it: only everyday statements on
many topics.

Every sentence stands on its own (no pronoun points at another sentence), so any of a topic's
sentences, in any order, read as one paragraph about it.
"""

from __future__ import annotations

import random
from itertools import combinations

from shared.errors import UserError

TOPICS: dict[str, tuple[str, ...]] = {
    "weather": (
        "A cold wind blew in from the north overnight, and by morning the puddles had frozen solid.",
        "Weather forecasters use satellites, radar and balloons to predict how storms will move.",
        "Thunder is the sound of air expanding suddenly as a bolt of lightning heats it.",
        "In many coastal towns a thick fog rolls in each evening and lifts again before noon.",
        "Light rain fell all afternoon, so most people on the street carried umbrellas.",
        "Farmers watch the clouds closely during the harvest, hoping the dry spell will last a few more days.",
        "After a week of heavy snow the roads were finally cleared and the schools reopened.",
        "A rainbow appears when sunlight passes through falling raindrops and is split apart.",
    ),
    "cooking": (
        "Fresh bread tastes best when it has cooled just enough to slice without tearing.",
        "A good soup often starts with onions, carrots and celery cooked slowly in a little oil.",
        "Many cooks add a pinch of salt to sweet dishes because it brings out the other flavours.",
        "Rice should rest for a few minutes after cooking so that the steam can finish the job.",
        "The kitchen smelled of garlic and roasted peppers long after dinner was over.",
        "Kneading the dough for ten minutes gives the loaf a firmer, chewier texture.",
        "Some families cook the same holiday recipe every year, passing it down from grandparents to grandchildren.",
        "A sharp knife is safer than a blunt one, since it is less likely to slip on the food.",
    ),
    "travel": (
        "The night train crossed the mountains slowly, and most passengers slept until dawn.",
        "Travellers who pack light can move between cities without worrying about heavy bags.",
        "At the small harbour, fishing boats and ferries shared the same narrow dock.",
        "Learning a few words of the local language usually makes a trip more pleasant.",
        "The airport was crowded on the first day of the summer holidays, and many flights left late.",
        "A long road trip gives people time to talk, listen to music and watch the landscape change.",
        "Old maps of the region show roads that have long since disappeared under the forest.",
        "The hostel near the station offered cheap beds, a shared kitchen and a view of the river.",
    ),
    "history": (
        "The ancient Romans built their roads so well that some of them are still used today.",
        "Before the printing press, books were copied out by hand and cost a great deal.",
        "The castle on the hill was built in the twelfth century to guard the river crossing.",
        "For thousands of years people kept track of time by watching the sun, the moon and the stars.",
        "Many towns grew up around markets where farmers came to trade grain, wool and livestock.",
        "The steam engine changed how goods and people moved from one place to another.",
        "Archaeologists found pottery, coins and tools buried beneath the old city walls.",
        "Letters written by soldiers during the war describe long marches, bad food and homesickness.",
    ),
    "nature": (
        "Deep in the forest the only sounds were birdsong and the creak of old branches.",
        "Bees visit thousands of flowers every day, carrying pollen from one plant to the next.",
        "The river widens as it nears the sea, slowing down and dropping the sand it carries.",
        "In autumn the leaves of the maple trees turn bright red before they fall.",
        "Foxes are often seen at dusk, when they leave their dens to hunt for food.",
        "Moss grows thickest on rocks and tree trunks that stay damp and shaded.",
        "The lake freezes from the edges inward, and the middle is the last part to turn to ice.",
        "Migrating geese fly in a long V, which helps each bird save energy on the journey.",
    ),
    "science": (
        "Water boils at a lower temperature high in the mountains because the air pressure there is lower.",
        "Plants use the energy of sunlight to turn water and carbon dioxide into sugar and oxygen.",
        "A magnet pulls on iron because the tiny magnetic regions inside the metal line up with it.",
        "Light from the sun takes about eight minutes to reach the Earth.",
        "Vaccines train the immune system to recognise a germ before it can cause serious illness.",
        "Scientists repeat their experiments many times to make sure a result was not just luck.",
        "Sound travels faster through water than it does through air.",
        "The moon has no wind or rain, so the footprints left there by astronauts may last for millions of years.",
    ),
    "sports": (
        "The local football club trains twice a week on a muddy field behind the school.",
        "Marathon runners often slow down in the last few miles as their legs grow tired.",
        "Swimming is gentle on the joints, which is why many older people enjoy it.",
        "The tennis match lasted nearly four hours, and both players were exhausted by the end.",
        "Cyclists in the race rode in a tight group to shelter from the wind.",
        "A good coach notices small mistakes in technique long before the players do.",
        "The crowd cheered loudly when the home team scored in the final minute.",
        "Climbing indoors lets beginners practise safely before they try real rock.",
    ),
    "work": (
        "Many people now work from home for part of the week and go to the office on the other days.",
        "The bakery opens at six, so the bakers start work long before sunrise.",
        "Meetings tend to run shorter when everyone has read the agenda in advance.",
        "A new job often feels overwhelming for the first few weeks, until the routine becomes familiar.",
        "The carpenter measured each board twice before cutting it.",
        "Nurses on the night shift check on their patients every few hours.",
        "Small shops on the high street depend on regular customers who come back week after week.",
        "Taking short breaks during a long working day helps people stay focused.",
    ),
    "family": (
        "On Sunday afternoons the whole family gathered at the grandparents' house for a long lunch.",
        "Young children love to hear the same bedtime story night after night.",
        "The twins shared a bedroom until they were twelve, when they finally got rooms of their own.",
        "Old photographs in the attic showed relatives that nobody in the house could name anymore.",
        "Every summer the cousins spent two weeks together at a cottage by the lake.",
        "Parents often learn as much from raising their children as the children learn from them.",
        "The youngest son moved abroad to study but still called home every weekend.",
        "Grandmother kept a drawer full of buttons, string and letters from friends long gone.",
    ),
    "gardening": (
        "Tomatoes need plenty of sun and regular watering to ripen well.",
        "Gardeners dig compost into the soil to feed their plants and help the ground hold water.",
        "The first green shoots of spring appeared in the flower beds after a mild week.",
        "Slugs come out on damp nights and can strip a row of lettuce in a few hours.",
        "Pruning fruit trees in winter encourages them to grow stronger branches in spring.",
        "A small vegetable patch can feed a family with beans, courgettes and herbs all summer.",
        "The old stone wall at the end of the garden was covered in ivy and climbing roses.",
        "Seeds planted too deep may rot before they ever reach the light.",
    ),
    "music": (
        "The choir practised every Thursday evening in the hall next to the church.",
        "Learning to play the piano well takes years of patient daily practice.",
        "A street musician played the violin outside the station, and a few people stopped to listen.",
        "Folk songs were often passed on by ear long before anyone wrote them down.",
        "The drummer kept a steady beat while the rest of the band improvised.",
        "Many people find that quiet music helps them concentrate while they study.",
        "Before the concert the orchestra tuned their instruments to a single note from the oboe.",
        "Old records crackle a little, but some listeners prefer their warm sound.",
    ),
    "city": (
        "The city's buses run every ten minutes during the day and every half hour at night.",
        "Early in the morning, street cleaners sweep the squares before the cafes open.",
        "Tall apartment buildings line the avenue, their balconies full of plants and bicycles.",
        "Rush hour traffic moves so slowly that walking is often faster.",
        "The market in the old town sells fruit, cheese and flowers from the farms nearby.",
        "Parks give people in the city a place to relax, play and escape the noise.",
        "At night the bridges over the river are lit up in a warm yellow light.",
        "New cycle lanes have made it easier and safer to ride across town.",
    ),
    "sea": (
        "Fishing boats leave the harbour before dawn and return in the afternoon with their catch.",
        "The tide goes out twice a day, leaving pools full of crabs and small fish among the rocks.",
        "Lighthouses once guided ships safely past the dangerous rocks along the coast.",
        "Strong waves during the storm washed seaweed and driftwood high up the beach.",
        "Whales travel thousands of miles each year between their feeding and breeding grounds.",
        "Salt water is denser than fresh water, which makes it easier to float in the sea.",
        "Children built sandcastles near the water's edge and watched the tide wash them away.",
        "Coral reefs are home to a huge variety of fish, sponges and other sea creatures.",
    ),
    "reading": (
        "The public library lends books, films and music free of charge to anyone with a card.",
        "Reading aloud to young children helps them learn new words.",
        "The bookshop on the corner has a quiet room at the back with armchairs for readers.",
        "Some people read the last page of a novel first, which others find hard to understand.",
        "Newspapers used to arrive on doorsteps every morning, before most people read the news online.",
        "A good story can carry a reader to a place and a time they will never visit.",
        "Libraries keep their rare old books in cool, dry rooms to protect the paper.",
        "Many writers carry a notebook so that they can record ideas before they forget them.",
    ),
    "health": (
        "A short walk after dinner helps the body digest food and can improve sleep.",
        "Drinking enough water is especially important on hot days and during exercise.",
        "Most adults need about seven to nine hours of sleep each night.",
        "Stretching before and after exercise can help prevent stiff muscles.",
        "Fresh fruit and vegetables provide vitamins that the body cannot make on its own.",
        "Washing hands with soap is one of the simplest ways to stop illness from spreading.",
        "Doctors recommend regular check-ups even for people who feel perfectly well.",
        "Spending time outdoors in daylight can lift a person's mood.",
    ),
    "seasons": (
        "In early spring the days grow longer and the air starts to feel warmer.",
        "Summer evenings in the far north stay light until well after ten o'clock.",
        "Many villages hold a harvest festival in autumn with music, food and games.",
        "During the winter holidays, houses are decorated with lights and evergreen branches.",
        "The first frost of the year often catches gardeners by surprise.",
        "Schoolchildren count the days until the long summer break begins.",
        "Fireworks lit up the sky over the harbour at midnight to welcome the new year.",
        "In spring, lambs are born on the hill farms and the fields fill with wild flowers.",
    ),
}
MIN_SENTENCES, MAX_SENTENCES = 2, 4
_MAX_TRIES = 200  # draws spent looking for a paragraph that shares at most one sentence with each earlier one


def paragraphs(n: int, rng: random.Random) -> list[str]:
    """n paragraphs of MIN_SENTENCES to MAX_SENTENCES distinct sentences, each on one topic.

    Topics go round in an order shuffled every round, so they are evenly represented. A
    paragraph shares at most one sentence with every earlier one while the topic's sentences
    allow it (two paragraphs sharing two sentences would be near-duplicates); past that, after
    _MAX_TRIES draws, the last draw is kept.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"number of general-text records must be an integer >= 1, got {n!r}")
    topics = list(TOPICS)
    used_pairs: set[frozenset[str]] = set()
    out: list[str] = []
    for i in range(n):
        if i % len(topics) == 0:
            rng.shuffle(topics)
        sentences = TOPICS[topics[i % len(topics)]]
        for _ in range(_MAX_TRIES):
            chosen = rng.sample(sentences, rng.randint(MIN_SENTENCES, MAX_SENTENCES))
            pairs = {frozenset(pair) for pair in combinations(chosen, 2)}
            if not pairs & used_pairs:
                break
        used_pairs |= pairs
        out.append(" ".join(chosen))
    return out
