"""Small shared types that data/ and model/ both use (as detectron2's ``structures/``): the
class mapping and the FPN level rule. A leaf: nothing here imports data/, model/ or above."""
