// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @title Many token transfers in one transaction, for benchmarks and tests only
/// @notice Sends `amount` of `token` from this contract's own balance to every address of `to`, so that
///         hundreds of Transfer logs land per transaction and a large log history is built in seconds.
contract TransferFanout {
    using SafeERC20 for IERC20;

    function fanout(IERC20 token, address[] calldata to, uint256 amount) external {
        for (uint256 i = 0; i < to.length; ++i) {
            token.safeTransfer(to[i], amount);
        }
    }
}
