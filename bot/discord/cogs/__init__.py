"""One cog per area: generating, acting on results, a member's account, admin budgets."""
