"""Error type for problems found in a dataset on disk or in a split request."""

from __future__ import annotations

from collections.abc import Iterable

Problems = list[tuple[str, str]]
"""Problems found so far, as ``(path, message)`` pairs: readers append to it and raise one
:class:`DatasetError` with all of them at the end."""


class DatasetError(Exception):
    """One or more problems with a dataset, each tied to a file or a topic.

    ``str(err)`` gives one line per problem, ``"PATH: message"``, so a study
    script can print it as is and exit with status 2.

    Attributes:
        problems: The problems as ``(path, message)`` pairs, in the order found.
    """

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        """Create the error.

        Args:
            problems: ``(path, message)`` pairs; at least one.

        Raises:
            ValueError: If ``problems`` is empty.
        """
        self.problems: list[tuple[str, str]] = [(str(p), str(m)) for p, m in problems]
        if not self.problems:
            raise ValueError("DatasetError needs at least one problem")
        super().__init__(self._render())

    @classmethod
    def single(cls, path: object, message: str) -> DatasetError:
        """Create an error holding a single problem.

        Args:
            path: The file (or topic, such as ``"split"``) the problem concerns.
            message: What is wrong, in words a dataset curator understands.

        Returns:
            A DatasetError with one problem.
        """
        return cls([(str(path), message)])

    def __reduce__(self) -> tuple[type[DatasetError], tuple[list[tuple[str, str]]]]:
        """Pickle by problems, so the error survives crossing process boundaries (Ray)."""
        return (type(self), (self.problems,))

    def _render(self) -> str:
        return "\n".join(f"{path}: {message}" for path, message in self.problems)

    def __str__(self) -> str:
        return self._render()
