"""nested_differences: the differing leaves of two nested dicts, as dotted paths."""

from privattnet_jax import nested


def test_equal_dicts_have_no_differences():
  assert nested.nested_differences({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}}) == []


def test_leaves_and_missing_keys_in_sorted_order():
  a = {"model": {"name": "privattnet", "depth": 50}, "z": 1}
  b = {"model": {"name": "privnet", "width": 2}, "z": 1}
  assert nested.nested_differences(a, b) == [
    ("model.depth", 50, None),
    ("model.name", "privattnet", "privnet"),
    ("model.width", None, 2),
  ]


def test_prefix_and_missing_placeholder():
  assert nested.nested_differences({"x": 1}, {}, "score", missing="<absent>") == [
    ("score.x", 1, "<absent>")
  ]


def test_a_dict_against_a_leaf_is_one_difference():
  assert nested.nested_differences({"a": {"b": 1}}, {"a": 3}) == [("a", {"b": 1}, 3)]
