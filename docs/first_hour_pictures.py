"""Pictures for docs/first-hour.md: three labels, one coloured shape each, scribbled over; run it in an empty folder.

Writes labelled/<label>/ (12 each, to train on), more/<label>/ (a new labelled batch of 4 each, with one
labelling mistake planted), and inbox/ (9 unlabelled pictures, an exact copy of one, and a file that is no image).
"""
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

random.seed(0)
SHAPES = {"triceratops": ((200, 60, 40), "ellipse"),
          "stegosaurus": ((40, 150, 60), "triangle"),
          "velociraptor": ((50, 80, 200), "rectangle")}


def save(label, path):
    colour, shape = SHAPES[label]
    img = Image.new("RGB", (160, 120), tuple(random.randrange(150, 256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):  # scribbles, so that no two pictures look alike
        ends = [(random.randrange(160), random.randrange(120)) for _ in range(2)]
        draw.line(ends, fill=tuple(random.randrange(256) for _ in range(3)), width=2)
    x, y, s = random.randrange(10, 80), random.randrange(10, 50), random.randrange(35, 60)
    if shape == "ellipse":
        draw.ellipse([x, y, x + s, y + s], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    else:
        draw.rectangle([x, y, x + s, y + s], fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


for label in SHAPES:
    for i in range(12):
        save(label, f"labelled/{label}/{label}_{i:02d}.jpg")  # to train on
    for i in range(4):
        save(label, f"more/{label}/{label}_{i:02d}.jpg")      # a new labelled batch to check
    for i in range(3):
        save(label, f"inbox/new_{label}_{i}.jpg")             # unlabelled arrivals
save("triceratops", "more/stegosaurus/stegosaurus_04.jpg")    # a labeller's mistake
shutil.copy("inbox/new_triceratops_0.jpg", "inbox/new_triceratops_0_copy.jpg")  # an exact copy
Path("inbox/notes.txt").write_text("not a picture\n")         # a file that is no image
