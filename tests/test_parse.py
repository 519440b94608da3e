import pytest

from agegender.data.utkface import Labels, age_band, parse_name

GOOD = [
    ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),  # the normal form, 17 digits
    ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1)),  # a space before .jpg
    ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0)),  # no dot before jpg
    ("28_1_2_201701161846515488.jpg.chip.jpg", (28, 1, 2)),  # 18-digit datetime
    ("1_0_0_2016121914062309.jpg.chip.jpg", (1, 0, 0)),  # 16-digit datetime
    ("30_1_3_20170104212034524.JPG.CHIP.JPG", (30, 1, 3)),  # upper case
    ("45_0_4_20170104212034524.jpg", (45, 0, 4)),  # plain .jpg, no .chip.jpg
    ("45_0_4_20170104212034524.jpeg", (45, 0, 4)),
    ("45_0_4_20170104212034524.PNG", (45, 0, 4)),
    ("120_1_0_20170104212034524.jpg.chip.jpg", (120, 1, 0)),  # oldest allowed
    ("some/folder/crop_part1/7_1_3_20170104212034524.jpg.chip.jpg", (7, 1, 3)),
]

BAD = [
    ("39_1_20170116174525125.jpg.chip.jpg", "missing field"),
    ("61_1_20170109142408075.jpg.chip.jpg", "missing field"),
    ("26_2_2_20170116174525125.jpg.chip.jpg", "gender 2"),
    ("26_1_5_20170116174525125.jpg.chip.jpg", "race 5"),
    ("0_1_2_20170116174525125.jpg.chip.jpg", "age 0"),
    ("121_1_2_20170116174525125.jpg.chip.jpg", "age 121"),
    ("2a_1_2_20170116174525125.jpg.chip.jpg", "whole numbers"),
    ("26_1_2_3_20170116174525125.jpg.chip.jpg", "got 5 fields"),
    ("portrait.jpg", "missing field"),
    ("26_1_2_20170116174525125.gif", "not an image name"),
]


@pytest.mark.parametrize(("name", "labels"), GOOD)
def test_parse_good_names(name, labels):
    assert parse_name(name) == Labels(*labels)


@pytest.mark.parametrize(("name", "reason"), BAD)
def test_parse_bad_names_say_why(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_name(name)


def test_age_bands():
    assert [age_band(a) for a in (1, 9, 10, 19, 20, 39, 40, 59, 60, 116)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
    ]
